"""A grid's zero levels are pinned into a mask only when something may move a weight (lwpipe.grid.pin_zeros,
defer): a one-shot run holds no byte-a-weight mask, and model.lwp is byte for byte the file the pinned layer
gives."""

import torch
from torch import nn

from lwpipe.artifact import encode_model
from lwpipe.constraints import constraint
from lwpipe.grid import pin_deferred, quantize_layer
from lwpipe.settings import TrainSettings
from lwpipe.training import fit


def quantized(seed=0, prune=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
    for layer in (model[0], model[2]):
        if prune:
            from lwpipe.constraints import ensure_constraint

            ensure_constraint(layer).set_mask(layer.weight.detach().abs() > 0.05)
        quantize_layer(layer, 3, "symmetric", True)
    return model


def test_zeros_are_deferred_then_kept_where_the_weight_is_zero():
    model = quantized()
    c = constraint(model[0])
    assert c.mask is None and c.zeros_deferred
    w = model[0].weight.detach()
    assert (w == 0).any() and torch.equal(c.kept(model[0].parametrizations.weight.original), w != 0)


def test_the_file_is_the_same_bytes_as_with_the_mask_made():
    deferred = encode_model(quantized(), None)
    pinned = quantized()
    pin_deferred(pinned)
    assert constraint(pinned[0]).mask is not None and not constraint(pinned[0]).zeros_deferred
    assert encode_model(pinned, None) == deferred


def test_a_pruned_layer_is_pinned_at_once():
    model = quantized(prune=True)
    c = constraint(model[0])
    assert c.mask is not None and torch.equal(c.mask, model[0].weight.detach() != 0)


def test_training_pins_first_so_zeros_stay_zero():
    model = quantized()
    zero = model[0].weight.detach() == 0
    x, y = torch.randn(64, 64), torch.randint(0, 4, (64,))
    s = TrainSettings(epochs=3, lr=0.5, optimizer="sgd")
    fit(model, [(x, y)], s)
    assert constraint(model[0]).mask is not None
    assert (model[0].weight.detach()[zero] == 0).all()  # without the pin, lr 0.5 would move some off level 0


def test_deferred_zeros_survive_a_checkpoint_so_a_later_stage_still_pins_them():
    from lwpipe.constraints import apply_spec, model_spec

    model = quantized()
    spec, state = model_spec(model), model.state_dict()
    assert spec["0"]["zeros"] == "deferred" and spec["0"]["mask"] is False
    fresh = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
    apply_spec(fresh, spec)
    fresh.load_state_dict(state)
    assert constraint(fresh[0]).zeros_deferred
    pin_deferred(fresh)
    assert torch.equal(constraint(fresh[0]).mask, model[0].weight.detach() != 0)
