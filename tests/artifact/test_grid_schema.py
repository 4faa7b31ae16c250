"""Grids, dtypes and values of compressed layers: what the writer stores, the reader takes back exactly.

Every compressible layer type x granularity x stage chain that leaves a grid is encoded and read back
through lwpipe.load (the grid runs along the layer type's output axis: 1 for transformers' Conv1D);
forged files (valid checksums) with grids or dtypes the writer never produces are refused, naming the layer.
"""

import pytest
import torch
from torch import nn

import lwpipe
from lwpipe.artifact import ArtifactError, encode_model, read
from lwpipe.artifact.raw import tensor_bytes
from lwpipe.constraints import compressible_layers, constraint, effective_tensors, grid_axis, tied_layers
from lwpipe.errors import LwpipeError
from lwpipe.stages.quantize import binarize_layer, quantize_layer
from lwpipe.stages.share import share_layer
from tests.artifact.test_hostile import crafted, refusals


def hf_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return nn.Sequential(Conv1D(6, 8))  # weight [in 8, out 6]


def tiny_gpt2() -> nn.Module:
    """transformers Conv1D, Embedding, and lm_head tied to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=40,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg).eval()


LAYERS = {
    "linear": lambda: nn.Sequential(nn.Linear(8, 6)),
    "conv1d": lambda: nn.Sequential(nn.Conv1d(3, 4, 3)),
    "conv2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 3)),
    "embedding": lambda: nn.Sequential(nn.Embedding(10, 6)),
    "hf_conv1d": hf_conv1d,
    "tied": tiny_gpt2,
}
CHAINS = ["quantize", "quantize_asym", "binary", "share+quantize"]


def compress(model: nn.Module, chain: str, per_channel: bool) -> None:
    ties = tied_layers(model)
    for name, m in list(compressible_layers(model)):
        tied = ties.get(name, ())
        if chain == "binary":
            binarize_layer(m, per_channel, tied=tied)
            continue
        if chain.startswith("share"):
            share_layer(m, 3, tied=tied)
        quantize_layer(
            m,
            4 if chain.endswith("asym") else 6,
            "asymmetric" if chain.endswith("asym") else "symmetric",
            per_channel,
            tied,
        )


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_layer_type_granularity_and_chain_decodes_to_the_same_weights(kind, chain, granularity, tmp_path):
    torch.manual_seed(0)
    model, per_channel = LAYERS[kind](), granularity == "per_channel"
    if chain.startswith("share") and per_channel:  # one codebook for all channels: the stage refuses it
        with pytest.raises(ValueError, match="use per_tensor"):
            compress(model, chain, per_channel)
        return
    compress(model, chain, per_channel)
    want = {k: v.clone() for k, v in effective_tensors(model).items()}
    blob = encode_model(model, None)
    axes = {e["name"]: e["quant"]["axis"] for e in read(blob).header["layers"]}
    for name, m in compressible_layers(model):
        assert axes[f"{name}.weight"] == grid_axis(m, per_channel) == constraint(m).axis
    (tmp_path / "model.lwp").write_bytes(blob)
    torch.manual_seed(1)  # the fresh module's own weights differ: every value below comes from the file
    loaded = lwpipe.load(tmp_path / "model.lwp", module=LAYERS[kind]())
    got = effective_tensors(loaded)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if kind == "tied":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_a_conv1d_grid_runs_along_its_output_axis():
    model = hf_conv1d()
    quantize_layer(model[0], 8, "symmetric", per_channel=True)
    c = constraint(model[0])
    assert c.axis == 1 and c.scale.shape == (1, 6)  # weight [in, out]: one scale per output channel


def test_inspect_names_a_conv1d_grid_per_channel():
    from lwpipe.artifact.inspect import encoding

    model = hf_conv1d()
    quantize_layer(model[0], 8, "symmetric", per_channel=True)
    (layer,) = read(encode_model(model, None)).layers
    assert encoding(layer.form).endswith("8-bit per-channel")  # not "per-tensor"


def test_int8_export_levels_follow_the_grid_axis():
    from lwpipe.export import weight_levels

    model = hf_conv1d()
    quantize_layer(model[0], 8, "symmetric", per_channel=True)
    levels, scale = weight_levels(model)["0"]
    assert scale.shape == (6,) and levels.shape == (8, 6)
    assert torch.equal(levels.float() * scale.view(1, 6), model[0].weight.detach())


# -- forged files -------------------------------------------------------------------------------------
def grid_file(
    scale=0.5,
    shape=(2, 2),
    axis=None,
    scale_shape=None,
    zp_shape=None,
    dtype="float32",
    values=(0.5, -1.0, 1.5, 2.0),
    qmax=127,
    shared=False,
) -> bytes:
    """One quantized layer '0.weight' storing its values raw (a grid whose levels are not stored as levels)."""
    from lwpipe.constraints import scale_shape as grid_scale_shape

    ss = list(grid_scale_shape(shape, axis) if scale_shape is None else scale_shape)
    scales = torch.full(ss, scale, dtype=torch.float32)
    raw = tensor_bytes(scales) + tensor_bytes(torch.tensor(values).to(getattr(torch, dtype)))
    layer = {
        "name": "0.weight",
        "shape": list(shape),
        "dtype": dtype,
        "quant": {
            "bits": 8,
            "qmin": -qmax,
            "qmax": qmax,
            "axis": axis,
            "scale": [["float32"], ss],
            "zp": [0, ss if zp_shape is None else zp_shape],
        },
    }
    if shared:
        layer["shared"] = {"k": 2, "codebook": ["float32"]}
    else:
        layer["values"] = [dtype]
    return crafted([layer], raw=raw, dense_bytes=4 * len(values))


def test_a_forged_grid_file_of_the_right_form_loads(tmp_path):
    for axis, dtype in [(None, "float32"), (0, "float32"), (None, "float16")]:
        (tmp_path / "ok.lwp").write_bytes(grid_file(axis=axis, dtype=dtype))
        model = lwpipe.load(tmp_path / "ok.lwp", module=nn.Sequential(nn.Linear(2, 2, bias=False)))
        assert model[0].weight.tolist() == [[0.5, -1.0], [1.5, 2.0]]


def test_a_grid_along_another_axis_than_the_layer_types_output_axis_is_refused(tmp_path):
    (tmp_path / "axis1.lwp").write_bytes(grid_file(axis=1))
    with pytest.raises(
        ArtifactError,
        match=r"0.weight has a grid along axis 1, but its layer, a Linear, has its"
        r" output channels on axis 0",
    ):
        lwpipe.load(tmp_path / "axis1.lwp", module=nn.Sequential(nn.Linear(2, 2, bias=False)))
    (tmp_path / "axis0.lwp").write_bytes(grid_file(axis=0))
    conv = hf_conv1d()[0].__class__(2, 2)
    conv.register_parameter("bias", None)  # the file stores the weight only
    with pytest.raises(ArtifactError, match="a Conv1D, has its output channels on axis 1"):
        lwpipe.load(tmp_path / "axis0.lwp", module=nn.Sequential(conv))


BAD_GRIDS = {
    # 18.3: scale / zero point shapes that do not fit the layer and its granularity
    "scale_ones8": (grid_file(scale_shape=[1] * 8), "scale has shape [1, 1, 1, 1, 1, 1, 1, 1]"),
    "zp_ones8": (grid_file(zp_shape=[1] * 8), "zp has shape"),
    "per_tensor_as_1": (grid_file(scale_shape=[1]), "per-tensor grid of a [2, 2] weight has []"),
    "channel_flat": (grid_file(axis=0, scale_shape=[2]), "axis-0 grid of a [2, 2] weight has [2, 1]"),
    "channel_zp_wrong": (grid_file(axis=0, zp_shape=[1, 2]), "zp has shape [1, 2]"),
    "axis_2": (grid_file(axis=2, scale_shape=[1, 1]), "axis is 2"),
    "axis_true": (grid_file(axis=True, scale_shape=[1, 2]), "axis is True"),
    "axis_float": (grid_file(axis=1.0, scale_shape=[1, 2]), "axis is 1.0"),
    # 18.8: scales that give non-finite (or no) weights
    "scale_nan": (grid_file(scale=float("nan")), "grid scale is nan"),
    "scale_inf": (grid_file(scale=float("inf")), "grid scale is inf"),
    "scale_zero": (grid_file(scale=0.0), "grid scale is 0.0"),
    "scale_negative": (grid_file(scale=-0.5), "grid scale is -0.5"),
    "scale_3e38": (grid_file(scale=3e38), "give non-finite weights"),
    # 18.2: dtypes a compressed layer never has
    "dtype_int64": (grid_file(dtype="int64", values=(1, 2, 3, 4)), "dtype 'int64'"),
    "dtype_bool": (grid_file(dtype="bool", values=(True, False, True, True)), "dtype 'bool'"),
    "dtype_uint8": (grid_file(dtype="uint8", values=(1, 2, 3, 4)), "dtype 'uint8'"),
    "shared_float64": (grid_file(dtype="float64", shared=True), "a shared layer computes from a float32"),
}


def half_bias_file(value: float) -> bytes:
    """A float16-held bias '0.bias' with one non-finite value."""
    bias = torch.tensor([0.5, value], dtype=torch.float16)
    return crafted([], raw=tensor_bytes(bias), tensors=[["0.bias", ["float16"], [2], "float16", "half"]])


@pytest.mark.slow
def test_forged_grids_dtypes_and_values_are_refused_naming_the_layer(tmp_path):
    cases = {name: data for name, (data, _) in BAD_GRIDS.items()}
    cases |= {
        "half_nan": half_bias_file(float("nan")),
        "half_inf": half_bias_file(float("inf")),
        "half_minus_inf": half_bias_file(float("-inf")),
    }
    out = refusals(tmp_path, cases)  # ArtifactError, quickly, under a memory cap, in lwpipe.load and read
    for name, (_, why) in BAD_GRIDS.items():
        assert "'0.weight'" in out[name] and why in out[name], (name, out[name])
    for name in ("half_nan", "half_inf", "half_minus_inf"):
        assert "0.bias is held to float16 but holds NaN or Inf" in out[name], out[name]


def test_a_finite_half_bias_still_loads():
    art = read(half_bias_file(65504.0))
    assert art.tensors["0.bias"][0].tolist() == [0.5, 65504.0]


def test_the_encoder_refuses_a_grid_off_the_output_axis():
    model = hf_conv1d()
    quantize_layer(model[0], 8, "symmetric", per_channel=True)
    c = constraint(model[0])
    c.set_quant(c.bits, c.qmin, c.qmax, c.scale.reshape(6, 1)[:1].expand(8, 1), torch.zeros(8, 1), 0)
    with pytest.raises(LwpipeError, match="runs along axis 0, not along its output axis 1"):
        encode_model(model, None)


# -- every run verifies its own model.lwp ----------------------------------------------------------------
QUICK = [
    "model=tiny",
    "data=blobs",
    "~stages.prune.layers",
    "pipeline=[train,prune]",
    "stages.train.epochs=1",
    "stages.prune.finetune.epochs=0",
    "logger.console=null",
    "cache=false",
    "measure.latency=false",
]


@pytest.mark.slow
def test_a_gpt2_per_channel_run_ends_with_a_model_lwp_that_loads(tmp_path):
    from tests.helpers import run_recipe
    from tests.hf_helpers import make_texts, save_gpt2, write_txt

    rows = make_texts(24)
    args = [
        "recipe=gpt2_causal_lm",
        f"model.path={save_gpt2(tmp_path / 'gpt2')}",
        "pipeline=[quantize]",
        f"data.train={write_txt(tmp_path / 'train.txt', rows[:16])}",
        "stages.quantize.granularity=per_channel",
        f"data.test={write_txt(tmp_path / 'test.txt', rows[16:])}",
        "data.batch_size=8",
        "data.max_length=16",
        "eval.batch_size=16",
        "logger.console=null",
    ]
    run_recipe(args, tmp_path / "run")
    assert (tmp_path / "run" / "summary.json").exists()
    blob = (tmp_path / "run" / "model.lwp").read_bytes()
    axes = {e["name"]: e["quant"]["axis"] for e in read(blob).header["layers"]}
    assert axes["transformer.h.0.attn.c_attn.weight"] == 1 and axes["transformer.wte.weight"] == 0
    model = lwpipe.load(tmp_path / "run" / "model.lwp")  # rebuilt from the stored config, as a user loads it
    assert model.lm_head.weight is model.transformer.wte.weight


def perturbed_encoder(monkeypatch):
    """runner.write_encoded writing a model whose weights differ from the run's by one step."""
    import lwpipe.runner
    from lwpipe.artifact.encode import write_encoded
    from lwpipe.constraints import clone

    def encode(model, config, path, resized=False):
        other = clone(model)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1.0)
        return write_encoded(other, config, path, resized)

    monkeypatch.setattr(lwpipe.runner, "write_encoded", encode)


@pytest.mark.slow
def test_a_run_whose_model_lwp_decodes_to_other_weights_fails_without_a_summary(tmp_path, monkeypatch):
    from tests.helpers import run_recipe

    perturbed_encoder(monkeypatch)
    with pytest.raises(
        LwpipeError,
        match=r"model.lwp decodes to other weights than the model it was written "
        r"from \(.* differs\), so the run failed",
    ) as e:
        run_recipe(QUICK, tmp_path)
    assert "\n" not in str(e.value)
    assert (tmp_path / "model.lwp").exists() and not (tmp_path / "summary.json").exists()


CUT_ARTIFACT = """
import sys
import lwpipe.runner as runner
from pathlib import Path
encode = runner.write_encoded
def cut(model, config, path, resized):  # a file that does not load: its last byte cut off
    encode(model, config, path, resized)
    Path(path).write_bytes(Path(path).read_bytes()[:-1])
    return Path(path).stat().st_size
runner.write_encoded = cut
from lwpipe.cli import main
sys.argv = ["lwpipe", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_run_whose_model_lwp_does_not_load_exits_non_zero_with_a_failed_marker(tmp_path):
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-c", CUT_ARTIFACT, *QUICK, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert "the run's own model.lwp does not load, so the run failed" in p.stderr
    assert "Traceback" not in p.stderr
    assert (tmp_path / "run" / "FAILED").exists() and not (tmp_path / "run" / "summary.json").exists()
