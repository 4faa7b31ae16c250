"""Evaluation holds the constrained weights a second time only while they are small."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.grid import quantize_layer
from lwpipe.tasks import base


def quantized_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    for m in (model[0], model[2]):
        quantize_layer(m, 4, per_channel=True)
    return model


def test_constrained_bytes_counts_the_parametrized_weights():
    assert base.constrained_bytes(quantized_mlp()) == (16 * 32 + 32 * 4) * 4
    assert base.constrained_bytes(nn.Linear(3, 3)) == 0


def test_above_the_budget_each_forward_computes_the_constraints_again(monkeypatch):
    model, x = quantized_mlp(), torch.randn(5, 16)
    with base.evaluating(model):
        cached, cached_out = parametrize._cache_enabled, model(x)
    monkeypatch.setattr(base, "CACHE_BYTES", 100)  # below this model's 2,560 bytes
    with base.evaluating(model):
        uncached, uncached_out = parametrize._cache_enabled, model(x)
    assert cached and not uncached
    assert torch.equal(cached_out, uncached_out)  # the same numbers either way
