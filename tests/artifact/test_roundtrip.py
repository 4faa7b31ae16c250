"""encode -> load gives the same model, bit for bit, for every kind of layer."""

import pytest
import torch

import lwpipe
from lwpipe.artifact import ArtifactError, encode_model, read
from lwpipe.artifact.coding import entropy_bits
from lwpipe.artifact.inspect import main as inspect_main
from lwpipe.constraints import bias_dtype, constraint, effective_tensors, grid_attrs, hold_grid, model_spec
from lwpipe.grid import pin_deferred
from lwpipe.models import LeNet300
from tests.artifact.helpers import CONFIG, SmallConv, constrain, model_with

KINDS = [
    "untouched",
    "identity",
    "pruned",
    "shared",
    "pruned+shared",
    "quant",
    "quant_asym",
    "quant_channel",
    "pruned+quant_asym",
    "pruned+quant_channel",
    "shared+quant",
    "pruned+shared+quant",
    "pruned+shared+quant_asym",
    "pruned+shared+quant+half_bias",
]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same_model(a, b, x):
    assert torch.equal(a(x), b(x))
    ta, tb = effective_tensors(a), effective_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:  # bit patterns, so -0.0 vs 0.0 or a NaN payload would show
        assert torch.equal(bits_of(ta[k]), bits_of(tb[k])), k


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact(kind, tmp_path):
    m = model_with(kind)
    blob = encode_model(m, CONFIG)
    path = tmp_path / "model.lwp"
    path.write_bytes(blob)
    loaded = lwpipe.load(path, constrained=True)
    assert_same_model(m, loaded, torch.randn(64, 32))
    assert not loaded.training
    if kind not in ("untouched", "identity"):
        pin_deferred(m)  # a grid's deferred zeros are stored, and come back, as the mask pinning makes
        assert model_spec(loaded) == model_spec(m)  # the constraints come back too
    assert encode_model(loaded, CONFIG) == blob  # and encode to the same bytes
    plain = lwpipe.load(path)  # the default: constraints baked into ordinary weights
    assert_same_model(m, plain, torch.randn(64, 32))
    assert model_spec(plain) == {} and all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize(
    "kind,parts",
    [
        ("untouched", None),
        ("identity", None),
        ("pruned", {"mask", "values"}),
        ("shared", {"shared"}),
        ("quant_channel", {"quant"}),
        ("pruned+shared+quant", {"mask", "shared", "quant"}),
    ],
)
def test_each_layer_stores_only_what_it_needs(kind, parts):
    header = read(encode_model(model_with(kind), CONFIG)).header
    layers = {e["name"]: e for e in header["layers"]}
    if parts is None:  # stored as a plain tensor
        assert "1.weight" not in layers and "1.weight" in [t[0] for t in header["tensors"]]
        return
    stored = {k for k in ("mask", "shared", "quant", "values") if k in layers["1.weight"]}
    assert stored == parts
    if "shared" in parts and "quant" in parts:
        assert layers["1.weight"]["shared"]["codebook"] == "levels"  # the codebook at its 8-bit precision


def test_zero_points_per_channel_are_packed_levels():
    header = read(encode_model(model_with("quant_asym", "quant_channel"), CONFIG)).header
    layers = {e["name"]: e for e in header["layers"]}
    assert isinstance(layers["1.weight"]["quant"]["zp"][0], int)  # per tensor: one integer in the header
    m = model_with("untouched", "untouched")
    constrain(m[3], "quant_channel")
    c = constraint(m[3])
    c.set_quant(5, 0, 31, c.scale, torch.arange(8.0).view(8, 1), 0)  # asymmetric per channel
    assert read(encode_model(m, CONFIG)).header["layers"][0]["quant"]["zp"][0] == "levels"


def test_non_integer_zero_point_survives(tmp_path):
    m = model_with("quant_channel")
    c = constraint(m[1])
    c.set_quant(c.bits, c.qmin, c.qmax, c.scale, torch.full_like(c.scale, 0.25), 0)
    path = tmp_path / "m.lwp"
    path.write_bytes(encode_model(m, CONFIG))
    assert_same_model(m, lwpipe.load(path), torch.randn(8, 32))


def test_half_bias_is_two_bytes_and_comes_back(tmp_path):
    m = model_with("pruned+shared+quant+half_bias")
    blob = encode_model(m, CONFIG)
    tensors = {t[0]: t for t in read(blob).header["tensors"]}
    assert tensors["1.bias"][1][0] == "float16" and "half" in tensors["1.bias"]
    assert tensors["3.bias"][1][0] == "float32"
    path = tmp_path / "m.lwp"
    path.write_bytes(blob)
    assert bias_dtype(lwpipe.load(path, constrained=True)[1]) == torch.float16
    assert lwpipe.load(path)[1].bias.dtype == torch.float32  # plain: the fp16 values as ordinary floats


def test_int8_bias_is_stored_as_levels_and_comes_back(tmp_path):
    m = model_with("pruned+shared+quant")
    hold_grid(m, [(m[1], "bias"), (m[3], "bias")])
    blob = encode_model(m, CONFIG)
    tensors = {t[0]: t for t in read(blob).header["tensors"]}
    assert tensors["1.bias"][1] == ["levels", 8] and tensors["3.bias"][1] == ["levels", 8]
    path = tmp_path / "m.lwp"
    path.write_bytes(blob)
    x = torch.randn(8, 32)
    back = lwpipe.load(path, constrained=True)
    assert_same_model(m, back, x)
    assert torch.equal(grid_attrs(back[1])["bias"], grid_attrs(m[1])["bias"])
    assert encode_model(back, CONFIG) == blob  # decoded and encoded again: the same bytes
    assert torch.equal(lwpipe.load(path)(x), m(x))
    assert len(blob) < len(encode_model(model_with("pruned+shared+quant"), CONFIG)) - 24  # levels, not float32


def test_conv_layers_with_a_module_passed_in(tmp_path):
    torch.manual_seed(1)
    m = SmallConv().eval()
    constrain(m.conv, "pruned+quant_channel")
    constrain(m.fc, "pruned+shared+quant_asym")
    path = tmp_path / "m.lwp"
    path.write_bytes(encode_model(m, None))
    torch.manual_seed(2)
    loaded = lwpipe.load(path, module=SmallConv())
    assert_same_model(m, loaded, torch.randn(4, 3, 6, 6))
    with pytest.raises(ArtifactError, match="holds no model config; pass module="):
        lwpipe.load(path)
    assert inspect_main([str(path)]) == 0  # inspecting needs no model


def test_size_is_near_the_entropy_of_what_it_stores():
    """LeNet-300-100 on 8x8 inputs, 8% kept, 32 clusters on an 8-bit grid: the file is the entropy of
    its positions and indices plus little more than the fp16 biases."""
    torch.manual_seed(0)
    m = LeNet300(64, 10).eval()
    streams = 0.0
    for layer in (m.fc1, m.fc2, m.fc3):
        constrain(layer, "pruned+shared+quant+half_bias")
        c = constraint(layer)
        c.set_mask(layer.weight.detach().abs() >= layer.weight.detach().abs().flatten().quantile(0.92))
        keep = c.mask.flatten()
        streams += entropy_bits(keep.long().numpy())
        streams += entropy_bits(c.index.flatten()[keep].numpy())
    size = len(encode_model(m, {"_target_": "lwpipe.models.LeNet300", "in_features": 64, "num_classes": 10}))
    assert size < streams / 8 + 2 * 410 + 3 * 16 + 400  # + fp16 biases, 8-bit codebooks, tables and header


def test_inspect_rows_add_up_to_the_file():
    from lwpipe.artifact.inspect import rows

    blob = encode_model(model_with("pruned+shared+quant+half_bias", "pruned+quant_channel"), CONFIG)
    table = rows(read(blob))
    assert table[-1]["layer"] == "total" and table[-1]["bytes"] == len(blob)
    assert sum(r["bytes"] for r in table[:-1]) == len(blob)
    assert all(r["bytes"] > 0 for r in table[:-1])
    layer = next(r for r in table if r["layer"] == "1.weight")
    assert layer["kept"] == int(constraint(model_with("pruned")[1]).mask.sum())  # 30% kept, as built
    assert 0 < layer["weight_bits"] <= 4 and 0 < layer["index_bits"] < 3  # 16 clusters; H(0.3)/0.3 = 2.9 bits
