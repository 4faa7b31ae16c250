"""Stage `quantize`: uniform weight quantization, w_q = round(W / s) + z, on a per-layer grid.

Symmetric (z = 0, levels -(2^(b-1)-1)..2^(b-1)-1) or asymmetric (levels
0..2^b-1, with an integer zero point z so that 0.0 stays exact and pruned
zeros stay zeros). Per-tensor or per-output-channel scales (the output axis of
each layout: axis 1 for transformers' Conv1D, one scale per token for an
Embedding); bits per layer by name or glob (mixed precision). `step: s` sets
the grid step to s x the std of the layer's non-zero weights instead of
spreading 2^bits levels over the range (entropy-constrained scalar
quantization: the artifact entropy-codes the levels, so a finer step costs
bits, a wider `bits` grid does not). On a shared layer it quantizes the codebook,
so the index map, the cluster count and the mask are kept; otherwise the masked
weights. Fine-tuning is quantization-aware: the forward rounds, the backward
passes gradients straight through (constraints._RoundSTE).

Binary and ternary weights: `bits: 1` gives sign(W) * alpha with alpha the mean |W| of
the kept weights (per output channel with granularity=per_channel: XNOR-Net, Rastegari
et al. 2016); `scheme: ternary` gives {-alpha, 0, +alpha} (TWN, Li et al. 2016): weights
below delta = 0.7 * mean |W| join the mask, alpha is the mean |W| of the rest. Both sit on
the ordinary grid (levels -1 / +1, scale alpha, zero point 0; the zeros are mask), so the
artifact stores one sign symbol per kept weight. Trained with the straight-through estimator
(constraints._SignSTE); alpha and the ternary zeros are fixed when the stage runs.

Mixed precision by sensitivity: `bits: auto` with a `budget` (average bits per kept weight, or bytes of
the quantized weights) picks each layer's bits from `candidates` to minimise the summed Fisher-weighted
quantization error under the budget (HAWQ-style; lwpipe/mixed_precision.py), then quantizes and
fine-tunes as with per-layer bits. The allotment, the bits spent and the predicted vs measured loss
increase go to the log and to the stage's record.

`bias: float16` also holds every quantized layer's bias to float16 values
(constraints.HalfBias), so the artifact can store biases in 2 bytes; `bias: int8` holds them
to scale x an integer level in -127..127, one scale per bias (constraints.GridBias), and the
artifact entropy-codes the levels;
`norms: float16` does the same for LayerNorm / GroupNorm / BatchNorm weights
and biases (running statistics are buffers and stay exact).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from lwpipe import gptq
from lwpipe.blockwise import Calibrator, calibration_batches
from lwpipe.calibration import task_forward
from lwpipe.config import CalibrationSettings, Strict, TrainSettings
from lwpipe.constraints import (
    NORMS,
    check_layer_patterns,
    compressible_layers,
    constraint,
    dequantize,
    ensure_constraint,
    grid_axis,
    hold_grid,
    hold_half,
    in_axis,
    kept_kinds,
    layer_setting,
    original_weight,
    out_axis,
    tied_layers,
)
from lwpipe.context import Context
from lwpipe.errors import ConfigError
from lwpipe.loggers.console import format_quality
from lwpipe.metrics import evaluate
from lwpipe.mixed_precision import DEFAULT_CANDIDATES, allot, sensitivities
from lwpipe.registry import register
from lwpipe.training import fit

log = logging.getLogger("lwpipe")
Scheme = Literal["symmetric", "asymmetric", "ternary"]
# internally also "symmetric_full": symmetric levels over the whole signed range (-2^(b-1)..2^(b-1)-1, full_range)


class LayerQuant(Strict):
    bits: int | None = Field(None, ge=1, le=16)
    step: float | None = Field(None, gt=0, le=10)
    skip: bool = False


class Budget(Strict):
    """`bits: auto`'s budget, exactly one of: the average bits per kept weight, or the bytes of the quantized
    weights (kept weights x their bits / 8, before entropy coding). A plain number is bits_per_weight."""

    bits_per_weight: float | None = Field(None, gt=0, le=32)
    bytes: int | None = Field(None, ge=1, le=1 << 50)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("bits_per_weight", "bytes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of bits_per_weight, bytes; got {', '.join(given) or 'none'}")
        return self


class QuantizeConfig(Strict):
    bits: int | Literal["auto"] = 8  # 1: binary weights, sign(W) * alpha; auto: by sensitivity
    scheme: Scheme = "symmetric"  # ternary: {-alpha, 0, +alpha}, bits not used
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    group_size: int | None = Field(None, ge=1, le=1 << 20)  # per_channel: one scale per group of N inputs too
    full_range: bool = False  # symmetric: levels -2^(b-1)..2^(b-1)-1 (compressed-tensors')
    clip_search: bool = False  # group_size, symmetric: each group's scale by least MSE
    keep: list[Literal["embeddings", "output_head"]] = []  # layer kinds left as they are (a `layers` entry overrides)
    step: float | None = Field(None, gt=0, le=10)  # grid step = step x the layer's std; null: the range
    layers: dict[str, LayerQuant] = {}  # by module name or glob: "fc3", "conv*"
    bias: Literal["float32", "float16", "int8"] = "float32"  # int8: scale x level, levels entropy-coded
    norms: Literal["float32", "float16"] = "float32"  # LayerNorm / BatchNorm weight and bias
    budget: Budget | None = None  # bits: auto only: 3, {bits_per_weight: 3} or {bytes: N}
    candidates: list[int] | None = None  # bits: auto's widths; null: 1..6 and 8 (no 1 where binary can't)
    sensitivity: Literal["fisher", "fisher_diagonal"] = "fisher"  # bits: auto: the layer's Fisher block, or diagonal
    calibration_samples: int = Field(256, ge=1, le=1_000_000)  # bits: auto's Fisher / gptq's Hessians: examples
    method: Literal["rtn", "gptq"] = "rtn"  # rtn: round to nearest; gptq: levels by the input Hessian
    damp: float = Field(0.01, gt=0, le=1)  # gptq: H + damp x mean(diag H) x I
    block: int = Field(128, ge=1, le=1 << 20)  # gptq: columns per lazy-update block
    act_order: bool = False  # gptq: columns in order of decreasing H_jj
    sequential: bool = True  # gptq: block by block, each calibrated on the blocks before
    calibration: CalibrationSettings | None = None  # gptq: the top-level `calibration` (config.validate fills it)
    finetune: TrainSettings = TrainSettings()  # quantization-aware, through the STE

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 16):
            return v
        raise ValueError("must be a whole number of bits 1..16, or auto (bits per layer by sensitivity, with a budget)")

    @field_validator("budget", mode="before")
    @classmethod
    def _plain_budget(cls, v):
        return {"bits_per_weight": v} if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v):
        if v is not None and (not v or any(not 1 <= b <= 16 for b in v) or len(set(v)) != len(v)):
            raise ValueError("must be distinct whole numbers of bits 1..16, at least one")
        return sorted(v) if v is not None else v

    @model_validator(mode="after")
    def _consistent(self):
        check_binary(self)
        check_auto(self)
        check_gptq(self)
        check_group(self)
        check_full_range(self)
        check_clip(self)
        return self


def check_group(cfg: QuantizeConfig) -> None:
    """group_size splits a per-channel grid along the inputs: it needs per-channel scales and a grid of levels."""
    if cfg.group_size is None:
        return
    if cfg.granularity != "per_channel":
        raise ValueError(
            f"group_size={cfg.group_size} splits each output channel's scale into groups of inputs; "
            f"it needs granularity=per_channel, not {cfg.granularity}"
        )
    if cfg.step is not None or any(lc.step is not None for lc in cfg.layers.values()):
        raise ValueError(
            "group_size with step: a step grid is set by the layer's spread, not per group; drop step or group_size"
        )
    if cfg.bits == 1 or cfg.scheme == "ternary" or any(lc.bits == 1 for lc in cfg.layers.values()):
        raise ValueError(
            "group_size with binary / ternary weights: their scale is the mean |w|, per channel; "
            "drop group_size or use bits >= 2"
        )


def check_clip(cfg: QuantizeConfig) -> None:
    if cfg.clip_search and (cfg.group_size is None or cfg.scheme != "symmetric"):
        raise ValueError(
            f"clip_search=true shrinks each group's symmetric scale; it needs group_size and "
            f"scheme=symmetric (here group_size={cfg.group_size}, scheme={cfg.scheme})"
        )


def check_full_range(cfg: QuantizeConfig) -> None:
    """full_range widens the symmetric grid by its one extra negative level; other schemes have no such level."""
    binary = cfg.bits == 1 or any(lc.bits == 1 for lc in cfg.layers.values())
    if cfg.full_range and (cfg.scheme != "symmetric" or binary):
        raise ValueError(
            f"full_range=true uses the signed range -2^(b-1)..2^(b-1)-1 of a symmetric grid; it needs "
            f"scheme=symmetric and bits >= 2, not scheme={cfg.scheme}, bits={cfg.bits}"
        )


def check_gptq(cfg: QuantizeConfig) -> None:
    """damp / block / act_order go with method: gptq; gptq needs a grid of levels to choose from."""
    if cfg.method != "gptq":
        extra = sorted({"damp", "block", "act_order", "sequential"} & cfg.model_fields_set)
        if extra:
            raise ValueError(
                f"{extra[0]} is set but method={cfg.method}: {extra[0]} is only used by method: gptq; "
                f"set method: gptq or drop {extra[0]}"
            )
        return
    binary = cfg.bits == 1 or cfg.scheme == "ternary" or any(lc.bits == 1 for lc in cfg.layers.values())
    if binary or (cfg.bits == "auto" and 1 in (cfg.candidates or ())):
        raise ValueError(
            "method=gptq with binary / ternary weights (bits=1, scheme=ternary): GPTQ chooses levels "
            "on a grid of 2 bits or more; use method: rtn, or bits >= 2"
        )


def check_binary(cfg: QuantizeConfig) -> None:
    """bits=1 is sign(W) * alpha: there is no zero point for an asymmetric grid to move."""
    if cfg.scheme != "asymmetric":
        return
    bad = [("bits", 1)] * (cfg.bits == 1) + [(f"layers.{n}.bits", 1) for n, lc in cfg.layers.items() if lc.bits == 1]
    if bad:
        raise ValueError(
            f"{bad[0][0]}=1 with scheme=asymmetric: binary weights are sign(W) * alpha, symmetric "
            f"around 0 with no zero point; use scheme=symmetric (or ternary), or bits >= 2"
        )


def check_auto(cfg: QuantizeConfig) -> None:
    """budget / candidates go with bits: auto and nothing else; auto needs a budget its fewest bits fit."""
    auto = cfg.bits == "auto"
    if not auto:
        extra = [k for k in ("budget", "candidates") if getattr(cfg, k) is not None]
        if extra:
            raise ValueError(
                f"{extra[0]} is set but bits={cfg.bits}: {extra[0]} is only used by bits: auto "
                f"(bits per layer by sensitivity); set bits: auto or drop {extra[0]}"
            )
        return
    if cfg.scheme == "ternary":
        raise ValueError(
            "bits=auto with scheme=ternary: ternary weights have three levels whatever the bits; "
            "use scheme=symmetric or asymmetric with bits: auto"
        )
    if cfg.budget is None:
        raise ValueError(
            "bits=auto needs a budget: budget: 3 (average bits per kept weight), "
            "budget: {bits_per_weight: 3} or budget: {bytes: N} (of the quantized weights)"
        )
    if cfg.scheme == "asymmetric" and 1 in (cfg.candidates or ()):
        raise ValueError(
            "candidates holds 1 with scheme=asymmetric: binary weights are sign(W) * alpha, with no "
            "zero point; drop 1 from candidates or use scheme=symmetric"
        )
    fewest = min(auto_candidates(cfg, shared=False))
    bpw = cfg.budget.bits_per_weight
    if bpw is not None and bpw < fewest:
        raise ValueError(
            f"budget={bpw!r} bits per weight is below what the fewest candidate bits cost "
            f"({fewest} bit{'s' * (fewest > 1)} per kept weight); allowed: at least {fewest}"
        )


def auto_candidates(cfg: QuantizeConfig, shared: bool) -> list[int]:
    """The widths bits: auto picks from for one layer: `candidates`, or the default less 1 where binary weights
    cannot be (scheme=asymmetric, a shared layer)."""
    if cfg.candidates is not None:
        return list(cfg.candidates)
    return [b for b in DEFAULT_CANDIDATES if b > 1 or not (shared or cfg.scheme == "asymmetric")]


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
    if group is not None:
        qmin, qmax, scale, zero_point = group_grid(module, values, bits, scheme, group, clip)
    elif step is None:
        qmin, qmax, scale, zero_point = quant_grid(values, bits, scheme, per_channel, axis or 0)
    else:  # a codebook's spread is not the weights': take the std of the (masked) weights it gives
        spread = module.weight.detach() if c.shared else values
        qmin, qmax, scale, zero_point = std_grid(spread, step, bits, scheme, per_channel, axis or 0)
    c.set_quant(bits, qmin, qmax, scale, zero_point, axis, group)
    error = None
    if hessian is not None and not c.shared:  # check_order refuses gptq after share
        error = gptq_levels(module, c, hessian, scheme, clip)
    pin_zeros(module)
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
        x = padded.float()

        def error(s: torch.Tensor) -> torch.Tensor:
            return ((torch.clamp(torch.round(x / s), qmin, qmax) * s - x) ** 2).sum(1, keepdim=True)

        best, best_err = scale, error(scale)
        for f in CLIP_FACTORS[1:]:
            s, err = scale * f, error(scale * f)
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
        scale = best
    return qmin, qmax, scale.view(rows.shape[0], -1), zero_point.view(rows.shape[0], -1)


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
            gptq.from_rows(module, scale, c.scale.shape),
            gptq.from_rows(module, zero, c.scale.shape),
            c.axis,
            c.group,
        )
    values = dequantize(gptq.from_rows(module, q, w.shape), *c.grid())
    original_weight(module).data.copy_(values.to(original_weight(module).dtype))
    return error


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
    c.set_quant(1, -1, 1, alpha, torch.zeros_like(alpha), grid_axis(module, per_channel))
    pin_zeros(module)


def quantize_any(
    module: nn.Module,
    bits: int | None,
    cfg: QuantizeConfig,
    tied=(),
    step: float | None = None,
    hessian: dict | None = None,
) -> float | None:
    """One layer at its own `bits` (None: the stage's) and the stage's scheme; a layer with its own
    bits >= 2 under scheme=ternary gets the symmetric grid. Returns GPTQ's error when `hessian` is given."""
    per_channel = cfg.granularity == "per_channel"
    if bits is None and cfg.scheme == "ternary":
        binarize_layer(module, per_channel, ternary=True, tied=tied)
    elif (bits or cfg.bits) == 1:
        binarize_layer(module, per_channel, tied=tied)
    else:
        scheme = "symmetric" if cfg.scheme == "ternary" else cfg.scheme
        scheme = "symmetric_full" if cfg.full_range else scheme
        return quantize_layer(
            module, bits or cfg.bits, scheme, per_channel, tied, step, hessian, cfg.group_size, cfg.clip_search
        )
    return None


@torch.no_grad()
def pin_zeros(module: nn.Module) -> None:
    """Weights that round to 0 join the mask: sparsity only grows, later training cannot revive them."""
    c = ensure_constraint(module)
    if c.shared and c.mask is not None:  # from the codebook: no dense weight computed
        zero = c.codebook_values() == 0
        if bool(zero.any()):
            c.set_mask(~zero[c.index.int()])
        return
    c.set_mask(module.weight.detach() != 0)


@register("quantize")
class Quantize:
    Config = QuantizeConfig
    compresses = True

    def __init__(self, cfg: QuantizeConfig):
        self.cfg = cfg

    @staticmethod
    def check_order(cfg: QuantizeConfig, before) -> str | None:
        if cfg.method == "gptq" and any(s.type == "share" for s in before):
            return (
                "method=gptq after share: a shared layer's values are its codebook, which has no input Hessian "
                "to minimise against; use method: rtn after share, or drop share"
            )
        if cfg.granularity == "per_channel" and any(s.type == "share" for s in before):
            return (
                "granularity=per_channel after share: a shared layer has one codebook for the whole tensor, "
                "and per-channel scales would give each channel its own values (more than 2^bits per layer); "
                "use granularity=per_tensor, which quantizes the codebook itself"
            )
        if any(s.type == "share" for s in before) and (
            cfg.bits == 1
            or cfg.scheme == "ternary"
            or any(lc.bits == 1 for lc in cfg.layers.values())
            or (cfg.bits == "auto" and 1 in (cfg.candidates or ()))
        ):
            return (
                "binary / ternary weights (bits=1, candidates with 1, scheme=ternary) are their own 2- or "
                "3-value codebook; a k-means codebook before them only costs index bits: drop share"
            )
        return None

    @staticmethod
    def check_model(cfg: QuantizeConfig, model: nn.Module, path: str) -> None:
        check_layer_patterns(model, cfg.layers, path)

    def run(self, model: nn.Module, ctx: Context) -> nn.Module:
        done, biases = [], []
        ties = tied_layers(model)
        layers = dict(compressible_layers(model))
        settings = {}
        kept = kept_kinds(model, self.cfg.keep)
        for name, _m in compressible_layers(model):
            tied = ties.get(name, ())
            default = LayerQuant(skip=name in kept)
            settings[name] = layer_setting(name, self.cfg.layers, default, [t for t, _ in tied])
        if kept:
            log.info("  quantize keeps as they are (keep: %s): %s", ", ".join(self.cfg.keep), ", ".join(sorted(kept)))
        auto = self.cfg.bits == "auto"
        if auto:
            before, _ = evaluate(model, ctx.test_loader(), ctx.reference_outputs, task=ctx.task)  # vs uncompressed
            plan = self.allot(model, ctx, settings)
        errors = {}
        for group in self.order(model, settings):
            hessians = self.hessians(model, ctx, group) if self.cfg.method == "gptq" else {}
            for name in group:
                m, tied, lc = layers[name], ties.get(name, ()), settings[name]
                step = lc.step if lc.step is not None else self.cfg.step
                h = hessians.pop(name, None)
                hessian = (
                    None
                    if h is None
                    else {
                        "h": h,
                        "damp": self.cfg.damp,
                        "block": self.cfg.block,
                        "act_order": self.cfg.act_order,
                        "name": name,
                    }
                )
                error = quantize_any(m, plan["bits"][name] if auto else lc.bits, self.cfg, tied, step, hessian)
                if error is not None:
                    errors[name] = error
                done.append(m)
                biases += [(layer, "bias") for layer in [m] + [t for _, t in tied]]
        half = biases * (self.cfg.bias == "float16")
        if self.cfg.norms == "float16":
            half += [(m, a) for m in model.modules() if isinstance(m, NORMS) for a in ("weight", "bias")]
        hold_half(model, half)
        hold_grid(model, biases * (self.cfg.bias == "int8"))
        if auto:
            report_allotment(
                plan, before, evaluate(model, ctx.test_loader(), ctx.reference_outputs, task=ctx.task)[0], ctx
            )
        if self.cfg.method == "gptq":
            report_gptq(errors, [n for n, lc in settings.items() if not lc.skip and n not in errors], ctx)
        fit(
            model,
            ctx.train_loader(self.cfg.finetune.batch_size),
            self.cfg.finetune,
            loss_fn=ctx.loss,
            on_epoch=ctx.epoch_callback(model),
        )
        for m in done:  # QAT may have moved more weights onto level 0: keep them there too
            pin_zeros(m)
        return model

    def order(self, model: nn.Module, settings: dict[str, LayerQuant]) -> list[list[str]]:
        """The layers to quantize, in groups: one group (rtn), or block by block (gptq with sequential)."""
        names = [n for n, _ in compressible_layers(model) if not settings[n].skip]
        if self.cfg.method != "gptq":
            return [names]
        self.calibrator = Calibrator(model, self.calibration(), strict=self.cfg.calibration is not None)
        return self.calibrator.groups(names)

    def calibration(self) -> CalibrationSettings:
        """The top-level calibration settings; a config built without them (in code): the stage's own keys."""
        cfg = self.cfg
        return cfg.calibration or CalibrationSettings(
            samples=cfg.calibration_samples, seq_len=1 << 20, sequential=cfg.sequential
        )

    def hessians(self, model: nn.Module, ctx: Context, names: list[str]) -> dict[str, torch.Tensor]:
        """method: gptq: the input Hessians of the GPTQ-able layers among `names`, from `calibration.samples`
        training examples, through the model as it is now (earlier groups already quantized; a block's from
        the carried outputs of the blocks before it, lwpipe/blockwise.py)."""
        layers = {n: m for n, m in compressible_layers(model) if n in names and gptq.supports(m)}
        if not layers:
            return {}
        batches = calibration_batches(ctx, self.calibration(), self.cfg.finetune.batch_size or ctx.batch_size)
        hs, seen = self.calibrator.hessians(layers, batches, task_forward(ctx))
        if not seen:
            raise ConfigError(
                f"stages.{ctx.stage or 'quantize'}.method",
                "gptq",
                "needs calibration batches (the layers' input Hessians), and data.train gives none; use method: rtn",
            )
        log.info("  gptq: input Hessians of %d layers from %d calibration batches", len(hs), seen)
        return hs

    def quantizer(self, lc: LayerQuant):
        """How the stage puts one layer on a b-bit grid (its scheme, granularity and step), for sensitivities."""
        step = lc.step if lc.step is not None else self.cfg.step
        return lambda layer, bits: quantize_any(layer, bits, self.cfg, (), step)

    def allot(self, model: nn.Module, ctx: Context, settings: dict[str, LayerQuant]) -> dict:
        """bits: auto: the Fisher from calibration samples, Omega(l, b) per layer and candidate, then bits per
        layer (lwpipe/mixed_precision.py). A budget that cannot hold the fewest bits is a ConfigError, raised
        before any layer changes. Layers under `layers:` keep their bits (a skipped one counts 32 a weight)."""
        cfg = self.cfg
        layers = dict(compressible_layers(model))
        kept = {n: kept_count(m) for n, m in layers.items()}
        fixed = {n: 32 if lc.skip else lc.bits for n, lc in settings.items() if lc.skip or lc.bits is not None}
        free = [n for n in layers if n not in fixed]
        cands = {n: auto_candidates(cfg, shared=getattr(constraint(layers[n]), "shared", False)) for n in free}
        total = sum(kept.values())
        budget_bits = 8 * cfg.budget.bytes if cfg.budget.bytes is not None else cfg.budget.bits_per_weight * total
        fixed_bits = sum(fixed[n] * kept[n] for n in fixed)
        least = fixed_bits + sum(min(cands[n]) * kept[n] for n in free)
        chosen = None
        if least <= budget_bits:
            quantized = [n for n in layers if not settings[n].skip]
            widths = [cands[n] if n in cands else [fixed[n]] for n in quantized]
            table, seen = sensitivities(
                model,
                [layers[n] for n in quantized],
                widths,
                [self.quantizer(settings[n]) for n in quantized],
                ctx.calibration_batches(cfg.calibration_samples, batch_size=1),
                ctx.loss,
                diagonal=cfg.sensitivity == "fisher_diagonal",
            )
            if not seen:
                raise ConfigError(
                    f"stages.{ctx.stage or 'quantize'}.bits",
                    "auto",
                    "needs training batches for the Fisher (squared gradients), and data.train gives none",
                )
            table = dict(zip(quantized, table))
            chosen = allot([table[n] for n in free], [kept[n] for n in free], budget_bits - fixed_bits)
        if chosen is None:  # the DP's whole units can lose up to one unit a layer of a budget at its very edge
            raise budget_error(cfg, f"stages.{ctx.stage or 'quantize'}", least, total)
        bits = {n: fixed[n] for n in quantized if n in fixed} | dict(zip(free, chosen))
        bits = {n: bits[n] for n in quantized}  # in module order
        return {
            "bits": bits,
            "kept": kept,
            "total": total,
            "budget_bits": budget_bits,
            "samples": seen,
            "spent_bits": sum(b * kept[n] for n, b in bits.items())
            + sum(32 * kept[n] for n in layers if settings[n].skip),
            "predicted": 0.5 * sum(table[n][b] for n, b in bits.items()),
        }


def kept_count(module: nn.Module) -> int:
    """Weights the mask keeps (all of them without a mask)."""
    c = constraint(module)
    return int(c.mask.sum()) if c is not None and c.mask is not None else module.weight.numel()


def budget_error(cfg: QuantizeConfig, path: str, least: float, total: int) -> ConfigError:
    """The budget is below the fewest bits: name the key, its value and the least it may be here."""
    if cfg.budget.bytes is not None:
        key, value, minimum = "budget.bytes", cfg.budget.bytes, f"{math.ceil(least / 8)} bytes"
    else:
        key, value = "budget", cfg.budget.bits_per_weight
        minimum = f"{math.ceil(1000 * least / total) / 1000:g} bits per weight"
    return ConfigError(
        f"{path}.{key}",
        value,
        f"is below what the fewest bits cost on these {total:,} kept weights (the fewest candidate bits "
        f"per auto layer, the bits `layers` fixes, 32 a weight for a skipped layer); at least {minimum}",
    )


def report_allotment(plan: dict, before: dict, after: dict, ctx: Context) -> None:
    """Log bits: auto's allotment and its predicted vs measured effect, and put them in the stage's record."""
    measured = after["loss"] - before["loss"] if "loss" in after and "loss" in before else None
    fields = {
        "bits_allotted": plan["bits"],
        "avg_bits_per_weight": plan["spent_bits"] / max(plan["total"], 1),
        "budget_bits_per_weight": plan["budget_bits"] / max(plan["total"], 1),
        "quantized_weight_bytes": math.ceil(plan["spent_bits"] / 8),
        "predicted_loss_increase": plan["predicted"],
        "measured_loss_increase": measured,
        "quality_before_quantize": before.get("quality"),
        "quality_before_finetune": after.get("quality"),
    }
    ctx.stage_record.update(fields)
    metric = after.get("metric", "quality")
    log.info("  bits auto: %s", ", ".join(f"{n}={b}" for n, b in plan["bits"].items()))
    log.info(
        "  bits auto: %.3f bits per kept weight (budget %.3f, %d Fisher samples); loss increase predicted "
        "%.4g, measured %s (test set); %s %s before quantize, %s before fine-tune",
        fields["avg_bits_per_weight"],
        fields["budget_bits_per_weight"],
        plan["samples"],
        plan["predicted"],
        "-" if measured is None else f"{measured:.4g}",
        metric,
        format_quality(metric, before.get("quality")),
        format_quality(metric, after.get("quality")),
    )


def report_gptq(errors: dict[str, float], rounded: list[str], ctx: Context) -> None:
    """GPTQ's per-layer weighted error into the stage record; layers it could not take were rounded."""
    ctx.stage_record.update({"gptq_error": errors, "gptq_rounded_layers": rounded})
    if rounded:
        log.info("  gptq: rounded to nearest (no input activation GPTQ can use): %s", ", ".join(rounded))
