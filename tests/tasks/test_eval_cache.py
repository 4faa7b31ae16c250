"""Evaluation computes constrained weights once (parametrize.cached) only while they are small: a large model's
would be a second copy of it. Either way the figures are the same."""

import torch
from torch import nn
from torch.nn.utils import parametrize

import lwpipe.tasks.base as base
from lwpipe.grid import quantize_layer
from lwpipe.tasks.classification import Classification


def model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    for layer in (model[0], model[2]):
        quantize_layer(layer, 4, "symmetric", True)
    return model, [(torch.randn(16, 20), torch.randint(0, 3, (16,))) for _ in range(3)]


def test_a_large_models_constraints_are_not_cached_and_the_figures_do_not_change(monkeypatch):
    model, batches = model_and_batches()
    seen = []
    model[0].register_forward_pre_hook(lambda *_: seen.append(parametrize._cache_enabled))
    cached, out = Classification().evaluate(model, batches)
    assert base.constrained_bytes(model) == 4 * (20 * 32 + 32 * 3) and seen[-1]
    monkeypatch.setattr(base, "CACHED_BYTES", 100)
    plain, out2 = Classification().evaluate(model, batches)
    assert not seen[-1] and plain == cached and torch.equal(out, out2)
