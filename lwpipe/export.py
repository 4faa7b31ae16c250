"""Export to real int8 kernels for inference (static post-training quantization).

The quantize stage trains with *simulated* quantization (fake-quant on float
weights) for accuracy and size; it runs no faster. `to_int8` gives a module
whose Linear/Conv layers run torch.ao's x86 (fbgemm) int8 kernels, with
activation ranges calibrated on data you pass. `benchmarks/bench_int8.py`
times it against fp32.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from lwpipe.constraints import effective_tensors


def bake(compressed: nn.Module, plain: nn.Module) -> nn.Module:
    """Load the weights `compressed` computes with (masks, codebooks, grids applied) into
    `plain`, a fresh instance of the same architecture without constraints."""
    plain.load_state_dict(effective_tensors(compressed))
    return plain.eval()


def to_int8(plain: nn.Module, calibration: torch.Tensor, engine: str = "x86") -> nn.Module:
    """A real int8 copy of `plain` (no constraints attached: see `bake`), calibrated on `calibration`.

    Uses torch.ao's FX graph mode, the path that converts whole models on CPU;
    torch marks it deprecated in favour of torchao's pt2e flow, and its
    warnings are silenced here on purpose.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    model = copy.deepcopy(plain).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping(engine), (calibration[:1],))
        with torch.no_grad():
            prepared(calibration)  # static activation ranges
        return convert_fx(prepared)
