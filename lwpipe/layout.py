"""Layer types and layouts: which modules lwpipe compresses, and where their output and input channels lie.

Layouts differ: Linear, Conv and Embedding keep output channels (Embedding: tokens)
on axis 0, transformers' Conv1D stores its weight transposed, [in, out], so its
output channels are axis 1 (`out_axis`, `in_axis`: the compressed-weight schema's
axes of each layer kind, lwpipe/schema.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lwpipe.schema import input_axis, layer_kind, output_axis

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2), found by name so that lwpipe never imports transformers for it
    (through the MRO: a parametrized module's class is a generated subclass)."""
    return any(k.__name__ == "Conv1D" and k.__module__.startswith("transformers") for k in type(m).__mro__)


def is_compressible(m: nn.Module) -> bool:
    return isinstance(m, COMPRESSIBLE) or is_hf_conv1d(m)


def out_axis(m: nn.Module) -> int:
    """The weight's axis of output channels (Embedding: tokens); per-channel grids and structured pruning use it."""
    return output_axis(layer_kind(m))


def in_axis(m: nn.Module) -> int | None:
    """The weight's axis of input channels; None for Embedding, which has no input activation."""
    return input_axis(layer_kind(m))


def index_dtype(k: int) -> torch.dtype:
    """The narrowest dtype for codebook indices 0..k-1 (uint8 indexes as a mask, so it is widened in forward)."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 1 << 15 else torch.int32
