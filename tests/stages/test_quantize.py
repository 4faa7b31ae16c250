import pytest
import torch
from torch import nn

from lwpipe import checkpoint
from lwpipe.config import TrainSettings, validate
from lwpipe.constraints import GridBias, HalfBias, bias_dtype, constraint, dequantize, grid_attrs
from lwpipe.errors import LwpipeError
from lwpipe.models import TinyMLP
from lwpipe.stages.prune import Prune, PruneConfig
from lwpipe.stages.quantize import Quantize, QuantizeConfig, quant_grid, quantize_layer, std_grid
from lwpipe.stages.share import share_layer
from lwpipe.training import fit
from tests.helpers import TINY, compose_recipe


def levels(layer):
    """The weights' grid levels as floats, and how far they are from integers."""
    c = constraint(layer)
    q = layer.weight.detach() / c.scale + c.zero_point
    return q, (q - q.round()).abs().max().item()


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_grid_covers_values_within_half_a_step(scheme, per_channel):
    x = torch.randn(6, 20) * torch.arange(1, 7)[:, None] + (1.0 if scheme == "asymmetric" else 0.0)
    qmin, qmax, scale, zp = quant_grid(x, 4, scheme, per_channel)
    assert scale.shape == ((6, 1) if per_channel else ())
    assert torch.equal(zp, zp.round())  # an integer zero point: 0.0 is exactly on the grid
    assert dequantize(torch.zeros(()) + zp, scale, zp).abs().max() == 0
    q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    assert ((dequantize(q, scale, zp) - x).abs() <= scale / 2 + 1e-6).all()
    assert qmax - qmin + 1 <= 16


def test_symmetric_uses_restricted_range_and_asymmetric_all_levels():
    assert quant_grid(torch.randn(10), 3, "symmetric", False)[:2] == (-3, 3)
    assert quant_grid(torch.randn(10), 3, "asymmetric", False)[:2] == (0, 7)


def test_per_channel_is_finer_for_uneven_rows():
    x = torch.randn(4, 50) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])
    err = {}
    for pc in (False, True):
        qmin, qmax, s, z = quant_grid(x, 4, "symmetric", pc)
        err[pc] = (dequantize(torch.clamp(torch.round(x / s) + z, qmin, qmax), s, z) - x).abs()[0].max()
    assert err[True] < err[False] / 10


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_quantized_masked_layer_stays_on_grid_and_sparse_through_qat(model, ctx, scheme):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)
    zeros = model[1].weight.detach() == 0
    Quantize(
        QuantizeConfig(bits=3, scheme=scheme, granularity="per_channel", finetune=TrainSettings(epochs=3, lr=1e-2))
    ).run(model, ctx)
    q, off = levels(model[1])
    assert off < 1e-4
    assert (model[1].weight.detach()[zeros] == 0).all()
    c = constraint(model[1])
    assert (q >= c.qmin - 1e-4).all() and (q <= c.qmax + 1e-4).all()
    assert all(torch.unique(row).numel() <= 8 for row in model[1].weight.detach())  # a grid per channel


def test_ste_passes_gradient_inside_range_only():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.25, 0.1, 1.0]]))
    quantize_layer(layer, 4, "symmetric")
    constraint(layer).scale.fill_(0.1)  # levels -7..7 cover [-0.7, 0.7]: the 1.0 is clipped
    layer.weight.sum().backward()
    assert layer.parametrizations.weight.original.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_quantize_after_share_quantizes_the_codebook(model, ctx):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)
    share_layer(model[1], bits=3)
    c = constraint(model[1])
    index, mask = c.index.clone(), c.mask.clone()
    Quantize(QuantizeConfig(bits=4, finetune=TrainSettings(epochs=3, lr=1e-2))).run(model, ctx)
    assert torch.equal(c.index, index) and torch.equal(c.mask, mask)
    assert c.axis is None and c.scale.shape == ()
    _, off = levels(model[1])
    assert off < 1e-4
    w = model[1].weight.detach()
    assert torch.unique(w[w != 0]).numel() <= 8 and (w[~mask] == 0).all()


def test_per_channel_after_share_is_refused_with_reason():
    with pytest.raises(LwpipeError, match="one codebook for the whole tensor"):
        validate(compose_recipe(TINY + ["pipeline=[train,share,quantize]", "stages.quantize.granularity=per_channel"]))


def test_bits_and_scheme_are_bounded():
    with pytest.raises(LwpipeError, match=r"stages\.quantize\.bits=0"):
        validate(compose_recipe(TINY + ["stages.quantize.bits=0"]))
    with pytest.raises(LwpipeError, match=r"stages\.quantize\.scheme='affine'"):
        validate(compose_recipe(TINY + ["stages.quantize.scheme=affine"]))


def test_half_bias_stays_fp16_through_training_and_checkpoints(model, ctx, tmp_path):
    Quantize(QuantizeConfig(bits=8, bias="float16", finetune=TrainSettings(epochs=3, lr=1e-2))).run(model, ctx)
    for layer in (model[1], model[3]):
        assert bias_dtype(layer) == torch.float16
        b = layer.bias.detach()
        assert torch.equal(b, b.half().float())
        assert layer.parametrizations.bias.original.requires_grad  # still trained (straight through)
    checkpoint.save_state(model, tmp_path / "m.safetensors")
    fresh = checkpoint.load_state(TinyMLP(), tmp_path / "m.safetensors")
    assert bias_dtype(fresh[1]) == torch.float16
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))


def test_half_bias_gradient_is_identity():
    b = torch.tensor([0.1, 1000.3], requires_grad=True)
    out = HalfBias()(b)
    assert torch.equal(out, b.detach().half().float())
    (out * torch.tensor([2.0, 3.0])).sum().backward()
    assert b.grad.tolist() == [2.0, 3.0]


def test_int8_bias_stays_on_its_grid_through_training_and_checkpoints(model, ctx, tmp_path):
    before = model[1].bias.detach().clone()
    Quantize(QuantizeConfig(bits=8, bias="int8", finetune=TrainSettings(epochs=3, lr=1e-2))).run(model, ctx)
    for layer in (model[1], model[3]):
        scale = grid_attrs(layer)["bias"]
        b = layer.bias.detach()
        levels = b / scale
        assert torch.equal(levels.round() * scale, b) and levels.abs().max() <= 127
        assert layer.parametrizations.bias.original.requires_grad  # still trained (straight through)
    assert not torch.equal(model[1].bias.detach(), before)  # trained, not frozen
    checkpoint.save_state(model, tmp_path / "m.safetensors")
    fresh = checkpoint.load_state(TinyMLP(), tmp_path / "m.safetensors")
    assert torch.equal(grid_attrs(fresh[1])["bias"], grid_attrs(model[1])["bias"])
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))


def test_int8_bias_scale_spans_the_largest_bias():
    b = torch.tensor([0.5, -2.54, 0.01], requires_grad=True)
    out = GridBias(torch.tensor(2.54 / 127))(b)
    assert out[1].item() == pytest.approx(-2.54) and out[2].item() == 0.0  # 0.01 is under half a step
    out.sum().backward()
    assert b.grad.tolist() == [1.0, 1.0, 1.0]


def test_bias_dtype_without_constraint():
    assert bias_dtype(nn.Linear(2, 2)) == torch.float32
    assert bias_dtype(nn.Linear(2, 2, bias=False)) is None


def test_zeros_from_rounding_are_pinned_against_later_training(model, ctx):
    Quantize(QuantizeConfig(bits=2, finetune=TrainSettings(epochs=2, lr=1e-2))).run(model, ctx)
    zeros = model[1].weight.detach() == 0
    assert zeros.any()  # 2 bits, levels -1..1: many weights round to 0
    assert torch.equal(~constraint(model[1]).mask, zeros)
    fit(model, ctx.train_loader(), TrainSettings(epochs=3, lr=5e-2))
    assert (model[1].weight.detach()[zeros] == 0).all()


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_step_is_a_multiple_of_the_std_of_kept_weights(scheme, per_channel):
    x = torch.randn(6, 200) * torch.arange(1, 7)[:, None]
    x[:, :50] = 0  # pruned zeros do not shrink the std
    _, _, scale, zp = std_grid(x, 0.25, 8, scheme, per_channel)
    kept = x[:, 50:]
    want = 0.25 * (kept.std(1, unbiased=False, keepdim=True) if per_channel else kept.std(unbiased=False))
    assert torch.allclose(scale, want, rtol=1e-4)
    assert torch.equal(zp, zp.round())


def test_step_grid_keeps_weights_on_integer_levels_within_bits(model, ctx):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)
    std = {i: model[i].weight.detach()[constraint(model[i]).mask].std(unbiased=False).item() for i in (1, 3)}
    cfg = QuantizeConfig(bits=4, step=0.1, layers={"1": {"step": 0.5}}, finetune=TrainSettings(epochs=2, lr=1e-2))
    Quantize(cfg).run(model, ctx)
    for i, step in ((1, 0.5), (3, 0.1)):
        c = constraint(model[i])
        assert c.scale.item() == pytest.approx(step * std[i], rel=1e-5)
        q, off = levels(model[i])
        assert off < 1e-4 and q.min() >= c.qmin - 1e-4 and q.max() <= c.qmax + 1e-4  # clipped to the 4-bit grid
        assert c.mask.float().mean() <= 0.5  # sparsity only grows
    assert levels(model[3])[0].abs().max() > 7 - 1e-4  # a 0.1-std step reaches the grid's edge: clipped there


def test_step_after_share_keeps_the_codebook_size(model, ctx):
    share_layer(model[1], bits=3)
    Quantize(QuantizeConfig(bits=8, step=0.05)).run(model, ctx)
    w = model[1].weight.detach()
    _, off = levels(model[1])
    assert off < 1e-4 and torch.unique(w).numel() <= 8


@pytest.mark.parametrize("bad", ["+stages.quantize.step=0", "+stages.quantize.step=-0.1", "+stages.quantize.step=11"])
def test_step_is_bounded(bad):
    with pytest.raises(LwpipeError, match=r"stages\.quantize\..*step"):
        validate(compose_recipe(TINY + [bad]))


def test_layer_step_is_bounded():
    with pytest.raises(ValueError, match="step"):
        QuantizeConfig(layers={"1": {"step": 0}})
