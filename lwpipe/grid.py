"""Uniform quantization grids, w_q = round(W / s) + z, and putting a layer's weight on one.

The math of the `quantize` stage (lwpipe/stages/quantize.py), as k-means is in lwpipe/kmeans.py:
the integer range of a scheme (`quant_range`), a grid covering a tensor's range (`quant_grid`), a
grid whose step follows the spread of the non-zero weights (`std_grid`), per-group grids with an
optional MSE clip search (`rows_group_grid`), binary / ternary scales (`binary_scale`), and the
layer-level operations that set a `Compressed` grid: `quantize_layer` (round to nearest, or GPTQ's
levels), `binarize_layer`, `pin_zeros`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lwpipe import gptq
from lwpipe.constraints import (
    compressible_layers,
    constraint,
    dequantize,
    ensure_constraint,
    grid_axis,
    in_axis,
    original_weight,
    out_axis,
)

Scheme = Literal["symmetric", "asymmetric", "ternary"]
# internally also "symmetric_full": symmetric levels over the whole signed range (-2^(b-1)..2^(b-1)-1, full_range)


def quant_range(bits: int, scheme: Scheme) -> tuple[int, int]:
    if scheme == "symmetric":  # restricted range: the grid is symmetric around an exact 0
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    if scheme == "symmetric_full":  # the whole signed range, as compressed-tensors and GGUF store 4-bit weights
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@torch.no_grad()
def quant_grid(x: torch.Tensor, bits: int, scheme: Scheme, per_channel: bool, axis: int = 0):
    """(qmin, qmax, scale, zero_point) covering x; per_channel: one scale per slice along `axis`."""
    qmin, qmax = quant_range(bits, scheme)
    if per_channel:
        dims = tuple(d for d in range(x.dim()) if d != axis)
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    else:
        lo, hi = x.min(), x.max()
    lo, hi = lo.clamp(max=0).float(), hi.clamp(min=0).float()  # the grid always holds 0
    if scheme.startswith("symmetric"):  # full range: max |x| at (qmax - qmin) / 2 = 2^(b-1) - 1/2 steps
        scale = torch.maximum(-lo, hi) / (qmax if scheme == "symmetric" else (qmax - qmin) / 2)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero slice: any scale works
    if scheme == "asymmetric":
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)  # an integer, so 0.0 is exact
    return qmin, qmax, scale, zero_point


@torch.no_grad()
def std_grid(x: torch.Tensor, step: float, bits: int, scheme: Scheme, per_channel: bool, axis: int = 0):
    """(qmin, qmax, scale, zero_point) with scale = step x the std of x's non-zero values (pruned zeros
    excluded; per slice along `axis` when per_channel). Values beyond the `bits` grid are clipped.

    A step tied to the spread rather than the range is entropy-constrained scalar quantization: a few
    outliers no longer coarsen every other weight, and the artifact entropy-codes the levels, so the size
    follows the step (about log2(std/scale) + 2 bits a weight), not `bits`."""
    qmin, qmax = quant_range(bits, scheme)
    x = x.float()
    dims = tuple(d for d in range(x.dim()) if d != axis) if per_channel else tuple(range(x.dim()))
    kept = (x != 0).float()
    n = kept.sum(dims, keepdim=per_channel).clamp(min=1)
    mean = x.sum(dims, keepdim=per_channel) / n
    var = (((x - mean) * kept) ** 2).sum(dims, keepdim=per_channel) / n
    scale = step * var.sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero slice: any scale works
    if scheme.startswith("symmetric"):
        zero_point = torch.zeros_like(scale)
    else:  # the lowest value on level qmin, as far as the grid reaches; an integer, so 0.0 is exact
        lo = (x.amin(dims, keepdim=True) if per_channel else x.min()).clamp(max=0)
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return qmin, qmax, scale, zero_point


@torch.no_grad()
def quantize_layer(
    module: nn.Module,
    bits: int,
    scheme: Scheme = "symmetric",
    per_channel: bool = False,
    tied=(),
    step: float | None = None,
    hessian: dict | None = None,
    group: int | None = None,
    clip: bool = False,
) -> float | None:
    """Put the layer's weights (or its codebook, when shared) on a `bits`-bit grid: each weight to its nearest
    level, or, given `hessian` ({"h": H, "damp", "block", "act_order", "name"}), the levels GPTQ picks (its
    weighted error is returned). `group`: per-channel scales per `group` inputs too, on layers that can
    have them (grouped_layer); others keep one scale per channel."""
    c = ensure_constraint(module, tied)
    if c.shared:
        if per_channel:
            raise ValueError("a shared layer has one codebook for all channels; use per_tensor")
        values, axis = c.centroids.detach(), None
    else:
        values, axis = module.weight.detach(), grid_axis(module, per_channel)
    group = group if per_channel and not c.shared and grouped_layer(module) else None
    if group is not None:  # a group wider than the layer's inputs is one group: the file stores that width
        group = min(group, gptq.as_rows(module, values).shape[1])
        qmin, qmax, scale, zero_point = group_grid(module, values, bits, scheme, group, clip)
    elif step is None:
        qmin, qmax, scale, zero_point = quant_grid(values, bits, scheme, per_channel, axis or 0)
    else:  # a codebook's spread is not the weights': take the std of the (masked) weights it gives
        spread = module.weight.detach() if c.shared else values
        qmin, qmax, scale, zero_point = std_grid(spread, step, bits, scheme, per_channel, axis or 0)
    c.set_quant(bits, qmin, qmax, model_scale(scale, module), zero_point, axis, group)
    error = None
    if hessian is not None and not c.shared:  # check_order refuses gptq after share
        error = gptq_levels(module, c, hessian, scheme, clip)
    pin_zeros(module, defer=True)
    return error


def grouped_layer(module: nn.Module) -> bool:
    """Per-group scales: 2-D weights with an input axis (Linear, transformers' Conv1D), not Embedding or conv."""
    return module.weight.dim() == 2 and in_axis(module) is not None


def group_grid(module: nn.Module, w: torch.Tensor, bits: int, scheme: Scheme, group: int, clip: bool = False):
    """(qmin, qmax, scale, zero_point) with one scale per output channel and `group` inputs, in the layer's layout
    (grid_shape(shape, out_axis, group)); the last group may be shorter."""
    qmin, qmax, scale, zero_point = rows_group_grid(gptq.as_rows(module, w.detach().float()), bits, scheme, group, clip)
    return qmin, qmax, gptq.from_rows(module, scale, scale.shape), gptq.from_rows(module, zero_point, scale.shape)


CLIP_FACTORS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8)


def rows_group_grid(rows: torch.Tensor, bits: int, scheme: Scheme, group: int, clip: bool = False):
    """quant_grid per row and group of `group` columns of rows [outputs, inputs]: scales [outputs, groups].
    clip (symmetric grids): each group's scale shrunk by the factor of CLIP_FACTORS whose rounding leaves the
    least squared error on the group's weights (an MSE observer: the extremes clip a little, the rest gain)."""
    n = rows.shape[1]
    padded = torch.nn.functional.pad(rows, (0, (-n) % group)).reshape(-1, group)  # zeros: the grid holds 0 anyway
    qmin, qmax, scale, zero_point = quant_grid(padded, bits, scheme, True, 0)
    if clip and scheme.startswith("symmetric"):
        scale = clipped_scale(padded.float(), scale, qmin, qmax)
    return qmin, qmax, scale.view(rows.shape[0], -1), zero_point.view(rows.shape[0], -1)


CLIP_ROWS = 4096  # groups searched at a time: a few MB, so every factor's pass stays in the CPU's cache


def clipped_scale(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Each row's scale times the factor of CLIP_FACTORS with the least squared rounding error of the row's
    values x [groups, group] (the first such factor on ties), CLIP_ROWS groups at a time."""
    best = scale.clone()
    for i in range(0, x.shape[0], CLIP_ROWS):
        xs, ss = x[i : i + CLIP_ROWS], scale[i : i + CLIP_ROWS]
        top, top_err = ss, _rounding_error(xs, ss, qmin, qmax)
        for f in CLIP_FACTORS[1:]:
            s = ss * f
            err = _rounding_error(xs, s, qmin, qmax)
            better = err < top_err
            top, top_err = torch.where(better, s, top), torch.where(better, err, top_err)
        best[i : i + CLIP_ROWS] = top
    return best


def _rounding_error(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per row of x, the squared error of rounding it on the grid of step s (one allocation, in place after)."""
    return torch.div(x, s).round_().clamp_(qmin, qmax).mul_(s).sub_(x).pow_(2).sum(1, keepdim=True)


def gptq_levels(module: nn.Module, c, hessian: dict, scheme: Scheme, clip: bool = False) -> float:
    """Move the layer's weight onto the levels GPTQ chooses; the constraint's rounding then keeps exactly them."""
    w = original_weight(module).detach().float()  # before the grid (module.weight is already rounded)
    if c.mask is not None:
        w = w * c.mask
    rows = gptq.as_rows(module, w)
    mask = gptq.as_rows(module, c.mask) if c.mask is not None else None
    if c.group is None:
        scale, zero = row_grid(module, c.scale, w.shape), row_grid(module, c.zero_point, w.shape)
        regrid = None
    else:  # [outputs, groups]; each group's grid is recomputed from its columns as GPTQ reaches them
        scale, zero = gptq.as_rows(module, c.scale), gptq.as_rows(module, c.zero_point)
        regrid = lambda cols: rows_group_grid(cols, c.bits, scheme, cols.shape[1], clip)[2:]  # noqa: E731
    q, error, scale, zero = gptq.gptq_weight(
        rows,
        hessian["h"],
        scale,
        zero,
        c.qmin,
        c.qmax,
        mask,
        hessian["block"],
        hessian["damp"],
        hessian["act_order"],
        hessian["name"],
        c.group,
        regrid,
    )
    if c.group is not None:  # the grids GPTQ settled on, back in the layer's layout
        c.set_quant(
            c.bits,
            c.qmin,
            c.qmax,
            model_scale(gptq.from_rows(module, scale, c.scale.shape), module),
            gptq.from_rows(module, zero, c.scale.shape),
            c.axis,
            c.group,
        )
    values = dequantize(gptq.from_rows(module, q, w.shape), *c.grid())
    original_weight(module).data.copy_(values.to(original_weight(module).dtype))
    return error


def model_scale(scale: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A 16-bit layer's scales rounded to its dtype (kept in float32): level x scale is then computed exactly in
    that dtype, so runtimes that hold scales in the model's dtype (compressed-tensors, vLLM) serve the
    weights lwpipe.load rebuilds. A scale the dtype cannot hold (fp16 under- or overflow) stays as it is."""
    dtype = original_weight(module).dtype
    if dtype == torch.float32 or not dtype.is_floating_point:
        return scale
    rounded = scale.to(dtype).float()
    ok = torch.isfinite(rounded) & (rounded > 0)
    return torch.where(ok, rounded, scale)


def row_grid(module: nn.Module, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A grid tensor (a scalar, or per output channel in the weight's layout) as [outputs, 1] or a scalar."""
    return gptq.as_rows(module, t.expand(shape))[:, :1] if t.dim() else t


def binary_scale(w: torch.Tensor, keep: torch.Tensor, per_channel: bool, axis: int) -> torch.Tensor:
    """alpha = mean |w| over the kept weights (per slice along `axis` when per_channel); 1 where none is kept."""
    a, k = w.abs().float() * keep, keep.float()
    if per_channel:
        dims = tuple(d for d in range(w.dim()) if d != axis)
        alpha = a.sum(dims, keepdim=True) / k.sum(dims, keepdim=True).clamp(min=1)
    else:
        alpha = a.sum() / k.sum().clamp(min=1)
    return torch.where(alpha > 0, alpha, torch.ones_like(alpha))


@torch.no_grad()
def binarize_layer(module: nn.Module, per_channel: bool = False, ternary: bool = False, tied=()) -> None:
    """bits=1: sign(W) * alpha; ternary: weights with |W| <= 0.7 mean |W| (TWN's delta) join the mask first."""
    c = ensure_constraint(module, tied)
    if c.shared:  # check_order refuses it; a direct call says so too
        raise ValueError("binary / ternary weights need no codebook: quantize them without share")
    w, axis = module.weight.detach(), out_axis(module)
    keep = c.mask if c.mask is not None else torch.ones_like(w, dtype=torch.bool)
    if ternary:
        c.set_mask(w.abs() > 0.7 * binary_scale(w, keep, per_channel, axis))
        keep = c.mask
    alpha = binary_scale(w, keep, per_channel, axis)
    c.set_quant(1, -1, 1, model_scale(alpha, module), torch.zeros_like(alpha), grid_axis(module, per_channel))
    pin_zeros(module)


@torch.no_grad()
def pin_zeros(module: nn.Module, defer: bool = False) -> None:
    """Weights that round to 0 join the mask: sparsity only grows, later training cannot revive them.

    `defer`: a grid layer without a mask gets none yet (Compressed.zeros_deferred): until a weight can move
    its zeros are exactly where the computed weight is 0, so the mask (a byte a weight: 1 GB at 1 B
    parameters) is made only when something may move them: training (training.fit) or a later stage (the
    runner), both through pin_deferred. model.lwp stores such a layer as masked by its zeros, as before."""
    c = ensure_constraint(module)
    if defer and c.mask is None and c.quantized and not c.shared:
        c.defer_zeros = True
        return
    if c.shared and c.mask is not None:  # from the codebook: no dense weight computed
        zero = c.codebook_values() == 0
        if bool(zero.any()):
            c.set_mask(~zero[c.index.int()])
        return
    c.set_mask(module.weight.detach() != 0)


@torch.no_grad()
def pin_deferred(model: nn.Module) -> None:
    """Pin the zeros pin_zeros deferred, on every layer: before training or a stage that may move weights."""
    for _, m in compressible_layers(model):
        c = constraint(m)
        if c is not None and c.zeros_deferred:
            pin_zeros(m)
