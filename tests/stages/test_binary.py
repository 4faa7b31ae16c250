"""Binary (XNOR-Net) and ternary (TWN) weights on the ordinary quantization grid."""

import pytest
import torch
from pydantic import ValidationError

import lwpipe
from lwpipe import checkpoint
from lwpipe.artifact.encode import encode
from lwpipe.config import TrainSettings, validate
from lwpipe.constraints import constraint, model_spec
from lwpipe.errors import LwpipeError
from lwpipe.models import TinyMLP
from lwpipe.stages.prune import Prune, PruneConfig
from lwpipe.stages.quantize import Quantize, QuantizeConfig
from tests.helpers import compose_recipe

CONFIG = {"_target_": "lwpipe.models.TinyMLP"}


def pruned(model, ctx, sparsity=0.5):
    Prune(PruneConfig(sparsity=sparsity)).run(model, ctx)
    return [(m.weight.detach() != 0) for m in (model[1], model[3])]


@pytest.mark.parametrize("per_channel", [False, True])
def test_binary_is_sign_times_mean_abs_of_kept_weights(model, ctx, per_channel):
    kept = pruned(model, ctx)
    before = model[1].weight.detach().clone()
    g = "per_channel" if per_channel else "per_tensor"
    Quantize(QuantizeConfig(bits=1, granularity=g)).run(model, ctx)
    w = model[1].weight.detach()
    assert torch.equal(w != 0, kept[0])  # pruned zeros stay zeros, nothing else becomes zero
    if per_channel:
        alpha = (before.abs() * kept[0]).sum(1, keepdim=True) / kept[0].sum(1, keepdim=True)
    else:
        alpha = before.abs()[kept[0]].mean()
    assert torch.allclose(w, torch.sign(before) * alpha * kept[0], atol=1e-6)
    assert len(w[kept[0]].abs().unique()) == (w.shape[0] if per_channel else 1)


def test_ternary_uses_twn_threshold_and_values(model, ctx):
    before = model[1].weight.detach().clone()
    Quantize(QuantizeConfig(scheme="ternary", granularity="per_channel")).run(model, ctx)
    w = model[1].weight.detach()
    delta = 0.7 * before.abs().mean(1, keepdim=True)
    big = before.abs() > delta
    assert torch.equal(w != 0, big)
    alpha = (before.abs() * big).sum(1, keepdim=True) / big.sum(1, keepdim=True)
    assert torch.allclose(w, torch.sign(before) * alpha * big, atol=1e-6)
    assert all(len(row.unique()) <= 3 for row in w)


def test_binary_trains_through_the_ste_and_keeps_its_form(model, ctx):
    kept = pruned(model, ctx, 0.3)
    Quantize(QuantizeConfig(bits=1)).run(model, ctx)
    signs = model[1].weight.detach().sign().clone()
    c = constraint(model[1])
    alpha = c.scale.clone()
    Quantize(QuantizeConfig(bits=1, finetune=TrainSettings(epochs=3, lr=5e-2))).run(model, ctx)  # QAT again
    w = model[1].weight.detach()
    assert torch.equal(w != 0, kept[0])
    assert set(w[kept[0]].abs().unique().tolist()) <= {float(constraint(model[1]).scale)}
    assert not torch.equal(w.sign(), signs) or not torch.equal(alpha, constraint(model[1]).scale)


def test_sign_ste_passes_gradient_inside_the_clip_range_only(model, ctx):
    Quantize(QuantizeConfig(bits=1)).run(model, ctx)
    c = constraint(model[1])
    x = torch.tensor([0.1, -1.0, 1.4, 1.6, -2.0]) * c.scale
    x.requires_grad_(True)
    c.fake_quant(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "cfg", [dict(bits=1, granularity="per_channel"), dict(bits=1), dict(scheme="ternary", granularity="per_channel")]
)
def test_artifact_stores_binary_and_ternary_exactly_at_about_one_bit(model, ctx, tmp_path, cfg):
    pruned(model, ctx, 0.5)
    Quantize(QuantizeConfig(**cfg)).run(model, ctx)
    blob, stats = encode(model, CONFIG)
    path = tmp_path / "model.lwp"
    path.write_bytes(blob)
    loaded = lwpipe.load(path, constrained=True)
    x = torch.randn(32, 8)
    assert torch.equal(model(x), loaded(x))
    assert model_spec(loaded) == model_spec(model)
    plain = lwpipe.load(path)
    assert torch.equal(model(x), plain(x))
    levels = [s for s in stats if s["label"].endswith("levels")]
    for s in levels:  # one sign per kept weight: at most 1 bit each (plus a tiny frequency table)
        assert s["coded_bits"] <= s["n"] + 32
    assert sum(s["n"] for s in levels) == sum(int((m.weight != 0).sum()) for m in (model[1], model[3]))


def test_checkpoint_keeps_the_binary_grid(model, ctx, tmp_path):
    Quantize(QuantizeConfig(bits=1)).run(model, ctx)
    checkpoint.save_state(model, tmp_path / "c.safetensors")
    other = TinyMLP()
    checkpoint.load_state(other, tmp_path / "c.safetensors")
    x = torch.randn(8, 8)
    assert torch.equal(model(x), other(x)) and constraint(other[1]).bits == 1


def test_binary_with_asymmetric_is_refused():
    with pytest.raises(ValidationError, match="bits=1 with scheme=asymmetric"):
        QuantizeConfig(bits=1, scheme="asymmetric")
    with pytest.raises(ValidationError, match="layers.fc1.bits=1 with scheme=asymmetric"):
        QuantizeConfig(scheme="asymmetric", layers={"fc1": {"bits": 1}})
    with pytest.raises(ValidationError, match="bits"):
        QuantizeConfig(bits=0)


def test_binary_after_share_is_refused_in_order_check():
    with pytest.raises(LwpipeError, match="binary / ternary weights"):
        validate(compose_recipe(["pipeline=[train,prune,share,quantize]", "stages.quantize.bits=1"]))


def test_layers_with_their_own_bits_keep_an_integer_grid_under_ternary(model, ctx):
    Quantize(QuantizeConfig(scheme="ternary", layers={"3": {"bits": 8}})).run(model, ctx)
    assert constraint(model[1]).bits == 1 and constraint(model[3]).bits == 8
    assert constraint(model[3]).qmin == -127
