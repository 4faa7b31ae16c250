"""`Compressed`: mask, codebook and quantization grid of one weight, as one torch parametrization.

Its forward is

    w = centroids[index]        if shared (k-means codebook)      else original
    w = fake_quant(w)           if quantized (on the codebook when shared)
    w = where(mask, w, 0)       if masked

Later training runs *through* it (straight-through estimators for the rounding), so the
constraints hold by construction. `constraint` / `ensure_constraint` find or attach it on a layer
(the same instance on every module tied to the layer's weight).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.layout import index_dtype, out_axis


class _RoundSTE(torch.autograd.Function):
    """Round onto the grid; pass gradients straight through inside the clip range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        unclipped = torch.round(x / scale) + zero_point
        ctx.save_for_backward((unclipped >= qmin) & (unclipped <= qmax))
        return dequantize(torch.clamp(unclipped, qmin, qmax), scale, zero_point)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _SignSTE(torch.autograd.Function):
    """Binary weights (bits=1, XNOR-Net): sign(x) * scale; gradients pass straight through where
    |x| <= 1.5 scale (the grid's range plus half a step, as _RoundSTE's clip range)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x.abs() <= 1.5 * scale)
        return dequantize(torch.sign(x), scale, torch.zeros((), dtype=scale.dtype))

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The one place integer levels become floats; the artifact decoder calls this too."""
    return (q - zero_point) * scale


class Compressed(nn.Module):
    """Mask, codebook and quantization grid of one weight; each part optional."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("mask", None)
        self.register_buffer("index", None)
        self.register_parameter("centroids", None)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.bits = 0
        self.qmin = 0
        self.qmax = 0
        self.axis: int | None = None  # None: per-tensor; else the weight's axis of output channels
        self.group: int | None = None  # per-group: one scale per output channel and `group` consecutive inputs

    # -- state -----------------------------------------------------------------
    @property
    def shared(self) -> bool:
        return self.index is not None

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def spec(self) -> dict:
        """JSON-able description of which parts exist (tensors live in the state dict)."""
        return {
            "shape": list(self.shape),
            "mask": self.mask is not None,
            "shared": self.shared,
            "k": int(self.centroids.numel()) if self.shared else 0,
            "quant": {"bits": self.bits, "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis}
            | ({"group": self.group} if self.group is not None else {})
            if self.quantized
            else None,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> Compressed:
        """Empty placeholders of the right shapes, filled by load_state_dict."""
        c = cls(torch.Size(spec["shape"]))
        if spec["mask"]:
            c.mask = torch.ones(c.shape, dtype=torch.bool)
        if spec["shared"]:
            c.set_codebook(torch.zeros(c.shape, dtype=index_dtype(spec["k"])), torch.zeros(spec["k"]))
        q = spec["quant"]
        if q:
            shape = scale_shape(c.shape, q["axis"], q.get("group"))
            c.set_quant(
                q["bits"], q["qmin"], q["qmax"], torch.ones(shape), torch.zeros(shape), q["axis"], q.get("group")
            )
        return c

    def set_mask(self, mask: torch.Tensor) -> None:
        mask = mask.to(torch.bool)
        if self.mask is not None:
            mask = mask & self.mask  # a mask only ever shrinks
        self.mask = mask

    def set_codebook(self, index: torch.Tensor, centroids: torch.Tensor) -> None:
        self.index = index.to(index_dtype(centroids.numel()))
        self.centroids = nn.Parameter(centroids.detach().clone().float())

    def set_quant(self, bits, qmin, qmax, scale, zero_point, axis, group: int | None = None) -> None:
        self.bits, self.qmin, self.qmax, self.axis, self.group = int(bits), int(qmin), int(qmax), axis, group
        self.scale = scale.detach().clone().float()
        self.zero_point = zero_point.detach().clone().float()

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) broadcastable to the weight: per-group ones repeated over their inputs."""
        if self.group is None:
            return self.scale, self.zero_point
        inputs = 1 - self.axis  # groups are 2-D weights' only: the input axis is the other one
        n = self.shape[inputs]
        return tuple(
            t.repeat_interleave(self.group, dim=inputs).narrow(inputs, 0, n) for t in (self.scale, self.zero_point)
        )

    @torch.no_grad()
    def codebook_values(self) -> torch.Tensor:
        """The values the codebook entries take in forward (on the grid when quantized)."""
        c = self.centroids.detach()
        return dequantize(self.quant_levels(c), self.scale, self.zero_point) if self.quantized else c

    # -- forward ---------------------------------------------------------------
    def quant_levels(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels q of x on this layer's grid (no gradient); bits=1: the sign, levels -1 / +1."""
        if self.bits == 1:
            return torch.sign(x)
        scale, zero_point = self.grid()
        return torch.clamp(torch.round(x / scale) + zero_point, self.qmin, self.qmax)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:  # binary: the sign, not the nearest level (0 is not a level; pruned zeros are masked)
            return _SignSTE.apply(x, self.scale)
        return _RoundSTE.apply(x, *self.grid(), self.qmin, self.qmax)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.shared:
            c = self.centroids
            if self.quantized:
                c = self.fake_quant(c)
            w = c[self.index.int()]  # int32 indexes like int64 at half the memory
        else:
            w = original
            if self.quantized:
                w = self.fake_quant(w)
        if self.mask is not None:
            w = torch.where(self.mask, w, torch.zeros((), dtype=w.dtype))
        return w.to(original.dtype)  # grids and codebooks are float32: a bf16 / fp16 layer computes in its dtype


def grid_shape(shape, axis: int, group: int | None = None) -> tuple[int, ...]:
    """Shape of a per-channel scale along `axis` of a weight of `shape`; with `group` (2-D weights), also one
    per `group` consecutive inputs along the other axis (the last group may be shorter)."""
    if group is not None:
        return tuple(n if i == axis else -(-n // group) for i, n in enumerate(shape))
    return tuple(n if i == axis else 1 for i, n in enumerate(shape))


GRID_AXES = (0, 1)  # the output axes of the layouts lwpipe knows: out_axis of every compressible layer type


def grid_axis(module: nn.Module, per_channel: bool) -> int | None:
    """The axis a layer's grid scales run along: None per tensor, else the layer type's output axis
    (out_axis: 1 for transformers' Conv1D). The quantize stage, the encoder, the decoder and the int8
    export all ask this one function, so a grid the writer stores is one the reader accepts."""
    return out_axis(module) if per_channel else None


def scale_shape(shape, axis: int | None, group: int | None = None) -> tuple[int, ...]:
    """The shape of a grid's scale and zero point for a weight of `shape`: () per tensor."""
    return () if axis is None else grid_shape(shape, axis, group)


def constraint(module: nn.Module) -> Compressed | None:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight[0]
    return None


def ensure_constraint(module: nn.Module, tied=()) -> Compressed:
    """The layer's `Compressed` parametrization, attached (as identity) if missing; the same instance
    on every module in `tied` ((name, module) pairs from tied_layers) that shares the weight."""
    c = constraint(module)
    if c is None:
        c = Compressed(module.weight.shape)
        parametrize.register_parametrization(module, "weight", c, unsafe=True)
    for _, m in tied:
        if constraint(m) is not c:
            parametrize.register_parametrization(m, "weight", c, unsafe=True)
    return c


@torch.no_grad()
def release_original(module: nn.Module) -> None:
    """A shared layer computes from its codebook only: its frozen original weight is replaced by one
    broadcast zero of the same shape, so the dense copy's memory is freed (Deep Compression keeps no
    dense weights after sharing either). A state dict still has the tensor, as zeros."""
    w = original_weight(module)
    w.requires_grad_(False)
    w.data = torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)


def original_weight(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def ensure_constraint_as(module: nn.Module, c: Compressed, tied=()) -> None:
    """Register `c` on module and every tied module (the same instance)."""
    for m in [module] + [t for _, t in tied]:
        parametrize.register_parametrization(m, "weight", c, unsafe=True)
