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

from lwpipe.layout import index_dtype
from lwpipe.schema import GRID_AXES, Grid, layer_kind, scale_shape  # noqa: F401  (re-exported)
from lwpipe.schema import grid_axis as kind_grid_axis


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
        self.defer_zeros = False  # lwpipe.grid.pin_zeros(defer=True): see zeros_deferred
        self.form_grid: Grid | None = None  # bits, level bounds, axis, group (lwpipe/schema.py)

    # the grid's fields (0 / None without a grid): axis None per tensor, else the weight's output axis;
    # group: one scale per output channel and `group` consecutive inputs
    bits = property(lambda self: self.form_grid.bits if self.form_grid else 0)
    qmin = property(lambda self: self.form_grid.qmin if self.form_grid else 0)
    qmax = property(lambda self: self.form_grid.qmax if self.form_grid else 0)
    axis = property(lambda self: self.form_grid.axis if self.form_grid else None)
    group = property(lambda self: self.form_grid.group if self.form_grid else None)

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
            "quant": self.form_grid.spec() if self.quantized else None,
            **({"zeros": "deferred"} if self.zeros_deferred else {}),  # checkpoints and the cache keep it
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
            grid = Grid(q["bits"], q["qmin"], q["qmax"], q["axis"], q.get("group"))
            shape = grid.scale_shape(c.shape)
            c.set_quant(grid.bits, grid.qmin, grid.qmax, torch.ones(shape), torch.zeros(shape), grid.axis, grid.group)
        c.defer_zeros = spec.get("zeros") == "deferred"
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
        self.form_grid = Grid(int(bits), int(qmin), int(qmax), axis, group)
        self.scale = scale.detach().clone().float()
        self.zero_point = zero_point.detach().clone().float()

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) broadcastable to the weight: per-group ones repeated over their inputs."""
        return tuple(self.form_grid.expand(t, self.shape) for t in (self.scale, self.zero_point))

    @torch.no_grad()
    def codebook_values(self) -> torch.Tensor:
        """The values the codebook entries take in forward (on the grid when quantized)."""
        c = self.centroids.detach()
        return dequantize(self.quant_levels(c), self.scale, self.zero_point) if self.quantized else c

    @property
    def zeros_deferred(self) -> bool:
        """A grid whose zero levels are not yet in a mask (lwpipe.grid.pin_zeros, defer): they are where the
        computed weight is 0, and are pinned (pin_deferred) before anything can move a weight."""
        return self.defer_zeros and self.quantized and not self.shared and self.mask is None

    @torch.no_grad()
    def kept(self, original: torch.Tensor) -> torch.Tensor | None:
        """The positions the layer keeps: its mask, or, with zeros_deferred, where its computed weight is not
        0 (the mask pinning would give), computed now and not held."""
        if self.zeros_deferred:
            return self(original) != 0
        return self.mask

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
        scale, zero_point = self.grid()
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            return _RoundSTE.apply(x, scale, zero_point, self.qmin, self.qmax)
        # no gradient (evaluation, calibration, a large model's weights computed per batch): _RoundSTE's
        # arithmetic, bit for bit, in one buffer and without the clip mask it keeps for a backward pass
        q = torch.div(x, scale).round_().add_(zero_point).clamp_(self.qmin, self.qmax)
        return q.sub_(zero_point).mul_(scale)

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
    """Shape of a per-channel scale along `axis` of a weight of `shape` (lwpipe/schema.scale_shape)."""
    return scale_shape(shape, axis, group)


def grid_axis(module: nn.Module, per_channel: bool) -> int | None:
    """The axis a layer's grid scales run along: None per tensor, else the layer type's output axis
    (1 for transformers' Conv1D), as lwpipe/schema.py decides it for each layer kind."""
    return kind_grid_axis(layer_kind(module), per_channel)


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
