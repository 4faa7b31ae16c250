"""The grid's scales in a 16-bit model's dtype: level x scale is exact in that dtype, as runtimes compute it."""

import pytest
import torch
from torch import nn

from lwpipe.compressed import dequantize
from lwpipe.constraints import constraint
from lwpipe.grid import quant_grid, quantize_layer


def linear(dtype):
    torch.manual_seed(0)
    return nn.Linear(64, 16, bias=False).to(dtype)


def served(layer):
    """The weight a runtime holding scales in the model's dtype serves: levels x scale in that dtype."""
    c, w = constraint(layer), layer.weight
    scale, zero = c.grid()
    levels = c.quant_levels(w.detach().float())
    return (levels - zero).to(w.dtype) * scale.to(w.dtype)


def gptq_hessian():
    x = torch.randn(256, 64)
    return {"h": 2 * x.T @ x, "damp": 0.01, "block": 16, "act_order": True, "name": "layer"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("group", "gptq"), [(None, False), (16, False), (16, True)])
def test_16_bit_layers_get_scales_their_dtype_holds(dtype, group, gptq):
    layer = linear(dtype)
    quantize_layer(layer, 4, per_channel=True, group=group, hessian=gptq_hessian() if gptq else None)
    scale = constraint(layer).scale
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.to(dtype).float())
    assert torch.equal(layer.weight.detach(), served(layer))


def test_float32_layers_keep_their_scales():
    layer = linear(torch.float32)
    quantize_layer(layer, 4, per_channel=True)
    *_, scale, zero = quant_grid(layer.weight.detach(), 4, "symmetric", True, 0)
    assert torch.equal(constraint(layer).scale, scale)
    assert not torch.equal(scale, scale.to(torch.bfloat16).float())  # so the test above could fail
    assert torch.equal(layer.weight.detach(), dequantize(constraint(layer).quant_levels(layer.weight), scale, zero))
