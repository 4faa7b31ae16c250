"""What the runner records after every step: held-out quality and the model's size."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from lwpipe.constraints import compressible_layers, constraint, parameter_shapes
from lwpipe.tasks.classification import Classification

NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # the float dtypes numpy has
CHUNK = 1 << 22  # weights histogrammed at a time


def evaluate(model: nn.Module, loader: Iterable, reference=None, task=None) -> tuple[dict, object]:
    """(quality metrics, outputs) on held-out data: the task's metrics (classification: accuracy, loss,
    teacher_agreement against reference predictions), `metric` and `quality`; outputs are what a later
    model's are compared with."""
    return (task or Classification()).evaluate(model, loader, reference)


@torch.no_grad()
def measure(model: nn.Module) -> dict:
    """Size statistics of the weights the model actually computes with.

    `dense_bytes` are the model's bytes in its own dtype (`dense_dtype`: the dtype of most of them), the
    bytes every record's compression_ratio divides. Every parameter counts, once (a tied weight once, a
    parametrized one as the value it computes), so `sparsity` is the share of zeros over the whole model:
    untouched tensors (embeddings a recipe skips, norms, biases) lower it. Tensors are computed one at a
    time, never the whole model at once.
    """
    modules = dict(model.named_modules())
    n_params = nonzero = 0
    bytes_by_dtype: dict[torch.dtype, int] = {}
    for name in parameter_shapes(model):
        owner, _, attr = name.rpartition(".")
        v = getattr(modules[owner], attr)
        n_params += v.numel()
        nonzero += int(v.count_nonzero())
        bytes_by_dtype[v.dtype] = bytes_by_dtype.get(v.dtype, 0) + v.numel() * v.element_size()
    max_unique = max((distinct_nonzero(m) for _, m in compressible_layers(model)), default=0)
    return {
        "params": n_params,
        "nonzero_params": nonzero,
        "sparsity": 1 - nonzero / n_params if n_params else 0.0,
        "max_unique_weights": max_unique,
        "dense_bytes": sum(bytes_by_dtype.values()),  # in the model's own dtype(s): a bf16 model's are 2 a parameter
        "dense_dtype": dtype_name(bytes_by_dtype),
        # compression_ratio is the input model's dense_bytes (in dense_dtype) over model.lwp's bytes
        "compression_ratio_against": f"input model's {dtype_name(bytes_by_dtype)} bytes",
    }


def dtype_name(bytes_by_dtype: dict) -> str:
    """The dtype of most of the parameter bytes ("bfloat16"); "float32" for a model without parameters."""
    return str(max(bytes_by_dtype, key=bytes_by_dtype.get)).removeprefix("torch.") if bytes_by_dtype else "float32"


def distinct_nonzero(m: nn.Module) -> int:
    """Distinct non-zero values of the layer's weight; from the codebook when shared (no sort of the weight)."""
    c = constraint(m)
    if c is not None and c.shared:
        kept = c.index[c.mask] if c.mask is not None else c.index.reshape(-1)
        used = torch.bincount(kept.int(), minlength=c.centroids.numel()) > 0
        values = c.codebook_values()[used]
        return int(torch.unique(values[values != 0]).numel())
    w = m.weight.detach()
    if w.dtype in (torch.bfloat16, torch.float16):
        return distinct_16bit(w)
    if w.is_floating_point() and w.dtype not in NUMPY_FLOATS:  # float8: float32 holds each exactly
        w = w.float()
    return int(np.unique(w[w != 0].cpu().numpy()).size)  # 10x torch.unique on CPU


def distinct_16bit(w: torch.Tensor) -> int:
    """Distinct non-zero values of a bf16 / fp16 tensor, as np.unique counts them (every NaN one value): a
    histogram of its 2^16 bit patterns, a chunk at a time (no sort, no float32 copy of a 65 M-weight head)."""
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    flat = w.reshape(-1)
    for i in range(0, flat.numel(), CHUNK):
        bits = flat[i : i + CHUNK].cpu().contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        counts += torch.bincount(bits, minlength=1 << 16)
    live = counts > 0
    live[0] = live[0x8000] = False  # +0 and -0
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(w.dtype)
    is_nan = torch.isnan(patterns)
    return int((live & ~is_nan).sum()) + int(bool((live & is_nan).any()))
