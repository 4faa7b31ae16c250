"""The dtype a model computes in, apart from the dtype it is kept in (`model.compute_dtype`).

A bf16 or fp16 checkpoint stays bf16 or fp16 in memory and in model.lwp, but a CPU without bf16 matrix
instructions (AVX2, and AVX-512 before Cooper Lake) runs bf16 matrix products several times slower than float32
ones (66 against 10 GFLOP/s a core on an AVX2 EPYC: 2048 x 5632 weights, 256 tokens). Inside `upcast()`, each
matrix product, convolution, attention and norm that meets a bf16/fp16 tensor computes in float32 instead: the
operands are widened for that one call (exact: every bf16 value is a float32 value) and nothing is written
back, so the model's weights, their dtype and their bytes never change, and without gradients at most one
layer's weight is alive in float32 at a time (a training step keeps each layer's float32 copy for its
backward pass, as torch.autocast does). Activations after the first product are float32; a layer that rounds to its own
dtype on purpose (a norm's `.to(input_dtype)`) still does.

    with upcast(torch.float32):                 # records, calibration: bf16 weights, float32 arithmetic
        task.evaluate(model, batches)

`auto` computes in float32 on a CPU and in the model's own dtype on a GPU (which has bf16 units); `native`
always in the model's own dtype; `float32` always in float32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lwpipe.errors import ConfigError

COMPUTE_DTYPES = ("auto", "float32", "native")
NARROW = (torch.bfloat16, torch.float16)

# the calls whose arithmetic is a model's time, and the norms (whose kernels take one dtype: a float32
# activation with its bf16 weight); elementwise work between them follows type promotion
WIDENED = {
    F.layer_norm,
    F.group_norm,
    F.batch_norm,
    F.instance_norm,
    F.rms_norm,
    F.linear,
    F.bilinear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.scaled_dot_product_attention,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__,
    torch.Tensor.mm,
    torch.Tensor.bmm,
}


def check(name) -> str:
    if name not in COMPUTE_DTYPES:
        raise ConfigError(
            "model.compute_dtype",
            name,
            f"allowed: {', '.join(COMPUTE_DTYPES)} (auto: float32 on a CPU, the model's own dtype on a GPU)",
        )
    return name


def compute_dtype(name: str, model: nn.Module, device) -> torch.dtype | None:
    """The dtype `model`'s narrow (bf16/fp16) arithmetic is widened to under `name`; None: computed as it is
    (a float32 model, `native`, or `auto` on a GPU)."""
    check(name)
    narrow = any(p.dtype in NARROW for p in model.parameters())
    if not narrow or name == "native" or (name == "auto" and torch.device(device).type != "cpu"):
        return None
    return torch.float32


def computed_in(dtype: torch.dtype | None, model: nn.Module) -> str:
    """The name of the dtype `model`'s arithmetic runs in (run_info.json's `compute_dtype`)."""
    if dtype is None:
        counts: dict[torch.dtype, int] = {}
        for p in model.parameters():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
        dtype = max(counts, key=counts.get) if counts else torch.float32
    return str(dtype).removeprefix("torch.")


class _Widen(TorchFunctionMode):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and _large(args[1]):
            return _linear_in_pieces(self.dtype, *args, **kwargs)
        if func in WIDENED:
            args, kwargs = _widened(args, self.dtype), _widened(kwargs, self.dtype)
        return func(*args, **kwargs)


PIECE_BYTES = 64 << 20  # a widened weight larger than this (an LM head: 32000 x 2048 is 250 MiB) goes in pieces


def _large(weight) -> bool:
    return isinstance(weight, torch.Tensor) and weight.dtype in NARROW and weight.numel() * 4 > PIECE_BYTES


def piece_rows(weight: torch.Tensor, dtype: torch.dtype) -> int:
    """Rows of `weight` whose copy in `dtype` takes at most PIECE_BYTES."""
    return max(1, PIECE_BYTES // (weight.shape[1] * torch.finfo(dtype).bits // 8))


def _linear_in_pieces(dtype, x, weight, bias=None):
    """F.linear with `weight` widened a block of output rows at a time: at most PIECE_BYTES of it in `dtype`."""
    rows = piece_rows(weight, dtype)
    x = _widened(x, dtype)
    parts = []
    for i in range(0, weight.shape[0], rows):
        b = None if bias is None else bias[i : i + rows].to(dtype)
        parts.append(F.linear(x, weight[i : i + rows].to(dtype), b))
    return torch.cat(parts, dim=-1)


def _widened(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in NARROW else value
    if type(value) in (list, tuple):
        return type(value)(_widened(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _widened(v, dtype) for k, v in value.items()}
    return value


def upcast(dtype: torch.dtype | None):
    """A context in which heavy calls on bf16/fp16 tensors compute in `dtype`; None: a context doing nothing."""
    return _Widen(dtype) if dtype is not None else contextlib.nullcontext()
