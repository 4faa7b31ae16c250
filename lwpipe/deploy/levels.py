"""The quantize stage's integer levels and scales of each layer, in the (out, in) layout deployable formats use."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from lwpipe.errors import ConfigError
from lwpipe.schema import layer_kind, output_axis


def weight_key(a: np.ndarray) -> tuple:
    """A weight's identity by value (found in a traced graph): its shape and a digest of its float32 bytes,
    not the bytes (a billion-parameter model's keys would be a second copy of it)."""
    return a.shape, hashlib.blake2b(np.ascontiguousarray(a, dtype=np.float32).data, digest_size=20).digest()


def hf_model(model: nn.Module, fmt: str, path: str):
    """The transformers model, or a ConfigError naming the format."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(path, fmt, f"needs a transformers model (model=hf); this model is {type(model).__name__}")
    return model


def quant_steps(before) -> list:
    return [s for s in before if s.type == "quantize"]


def share_steps(before) -> list:
    return [s for s in before if s.type == "share"]


@torch.no_grad()
def layer_grid(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict] | None:
    """(weight, levels, scale, info) of a quantized Linear / Conv1D, all (out, in), the scale repeated over
    the inputs of its group; None for a layer without grid. `info`: bits, qmin, qmax, group, symmetric,
    per_tensor, scheme, full_range: the layer's compressed form (lwpipe/schema.py)."""
    from lwpipe.constraints import constraint

    c = constraint(m)
    if c is None or not c.quantized or c.shared or m.weight.dim() != 2:
        return None
    grid, kind = c.form_grid, layer_kind(m)
    w = m.weight.detach().float()
    scale, zero = (t.float().expand_as(w) for t in c.grid())
    levels = torch.round(w / scale + zero)
    if output_axis(kind) == 1:  # transformers' Conv1D keeps (in, out), whatever its grid's granularity
        w, levels, scale, zero = w.T, levels.T, scale.T, zero.T
    info = {
        "bits": grid.bits,
        "qmin": grid.qmin,
        "qmax": grid.qmax,
        "group": grid.group,
        "per_tensor": grid.axis is None,
        "symmetric": bool((zero == 0).all()),
        "scheme": grid.scheme,
        "full_range": grid.full_range,
    }
    return w.contiguous(), levels.contiguous(), scale.contiguous(), info
