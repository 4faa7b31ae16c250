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

`bias: float16` also holds every quantized layer's bias to float16 values
(constraints.HalfBias), so the artifact can store biases in 2 bytes; `bias: int8` holds them
to scale x an integer level in -127..127, one scale per bias (constraints.GridBias), and the
artifact entropy-codes the levels;
`norms: float16` does the same for LayerNorm / GroupNorm / BatchNorm weights
and biases (running statistics are buffers and stay exact).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lwpipe.config import Strict, TrainSettings
from lwpipe.constraints import (NORMS, check_layer_patterns, compressible_layers, ensure_constraint, layer_setting,
                                hold_grid, hold_half, out_axis, tied_layers)
from lwpipe.context import Context
from lwpipe.registry import register
from lwpipe.training import fit

Scheme = Literal["symmetric", "asymmetric", "ternary"]


class LayerQuant(Strict):
    bits: int | None = Field(None, ge=1, le=16)
    step: float | None = Field(None, gt=0, le=10)
    skip: bool = False


class QuantizeConfig(Strict):
    bits: int = Field(8, ge=1, le=16)                  # 1: binary weights, sign(W) * alpha
    scheme: Scheme = "symmetric"                       # ternary: {-alpha, 0, +alpha}, bits not used
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    step: float | None = Field(None, gt=0, le=10)      # grid step = step x the layer's std; null: the range
    layers: dict[str, LayerQuant] = {}                 # by module name or glob: "fc3", "conv*"
    bias: Literal["float32", "float16", "int8"] = "float32"  # int8: scale x level, levels entropy-coded
    norms: Literal["float32", "float16"] = "float32"   # LayerNorm / BatchNorm weight and bias
    finetune: TrainSettings = TrainSettings()          # quantization-aware, through the STE

    @model_validator(mode="after")
    def _binary_has_no_zero_point(self):
        check_binary(self)
        return self


def check_binary(cfg: QuantizeConfig) -> None:
    """bits=1 is sign(W) * alpha: there is no zero point for an asymmetric grid to move."""
    if cfg.scheme != "asymmetric":
        return
    bad = [("bits", 1)] * (cfg.bits == 1) + [(f"layers.{n}.bits", 1) for n, lc in cfg.layers.items() if lc.bits == 1]
    if bad:
        raise ValueError(f"{bad[0][0]}=1 with scheme=asymmetric: binary weights are sign(W) * alpha, symmetric "
                         f"around 0 with no zero point; use scheme=symmetric (or ternary), or bits >= 2")


def quant_range(bits: int, scheme: Scheme) -> tuple[int, int]:
    if scheme == "symmetric":  # restricted range: the grid is symmetric around an exact 0
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
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
    if scheme == "symmetric":
        scale = torch.maximum(-lo, hi) / qmax
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
    if scheme == "symmetric":
        zero_point = torch.zeros_like(scale)
    else:  # the lowest value on level qmin, as far as the grid reaches; an integer, so 0.0 is exact
        lo = (x.amin(dims, keepdim=True) if per_channel else x.min()).clamp(max=0)
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return qmin, qmax, scale, zero_point


@torch.no_grad()
def quantize_layer(module: nn.Module, bits: int, scheme: Scheme = "symmetric", per_channel: bool = False,
                   tied=(), step: float | None = None) -> None:
    """Put the layer's weights (or its codebook, when shared) on a `bits`-bit grid."""
    c = ensure_constraint(module, tied)
    if c.shared:
        if per_channel:
            raise ValueError("a shared layer has one codebook for all channels; use per_tensor")
        values, axis = c.centroids.detach(), None
    else:
        values, axis = module.weight.detach(), (out_axis(module) if per_channel else None)
    if step is None:
        qmin, qmax, scale, zero_point = quant_grid(values, bits, scheme, per_channel, axis or 0)
    else:  # a codebook's spread is not the weights': take the std of the (masked) weights it gives
        spread = module.weight.detach() if c.shared else values
        qmin, qmax, scale, zero_point = std_grid(spread, step, bits, scheme, per_channel, axis or 0)
    c.set_quant(bits, qmin, qmax, scale, zero_point, axis)
    pin_zeros(module)


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
    c.set_quant(1, -1, 1, alpha, torch.zeros_like(alpha), axis if per_channel else None)
    pin_zeros(module)


def quantize_any(module: nn.Module, bits: int | None, cfg: QuantizeConfig, tied=(), step: float | None = None) -> None:
    """One layer at its own `bits` (None: the stage's) and the stage's scheme; a layer with its own
    bits >= 2 under scheme=ternary gets the symmetric grid."""
    per_channel = cfg.granularity == "per_channel"
    if bits is None and cfg.scheme == "ternary":
        binarize_layer(module, per_channel, ternary=True, tied=tied)
    elif (bits or cfg.bits) == 1:
        binarize_layer(module, per_channel, tied=tied)
    else:
        scheme = "symmetric" if cfg.scheme == "ternary" else cfg.scheme
        quantize_layer(module, bits or cfg.bits, scheme, per_channel, tied, step)


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
        if cfg.granularity == "per_channel" and any(s.type == "share" for s in before):
            return ("granularity=per_channel after share: a shared layer has one codebook for the whole tensor, "
                    "and per-channel scales would give each channel its own values (more than 2^bits per layer); "
                    "use granularity=per_tensor, which quantizes the codebook itself")
        if any(s.type == "share" for s in before) and (
                cfg.bits == 1 or cfg.scheme == "ternary" or any(lc.bits == 1 for lc in cfg.layers.values())):
            return ("binary / ternary weights (bits=1, scheme=ternary) are their own 2- or 3-value codebook; "
                    "a k-means codebook before them only costs index bits: drop share")
        return None

    @staticmethod
    def check_model(cfg: QuantizeConfig, model: nn.Module, path: str) -> None:
        check_layer_patterns(model, cfg.layers, path)

    def run(self, model: nn.Module, ctx: Context) -> nn.Module:
        done, biases = [], []
        ties = tied_layers(model)
        for name, m in compressible_layers(model):
            tied = ties.get(name, ())
            lc = layer_setting(name, self.cfg.layers, LayerQuant(), [t for t, _ in tied])
            if lc.skip:
                continue
            step = lc.step if lc.step is not None else self.cfg.step
            quantize_any(m, lc.bits, self.cfg, tied, step)
            done.append(m)
            biases += [(layer, "bias") for layer in [m] + [t for _, t in tied]]
        half = biases * (self.cfg.bias == "float16")
        if self.cfg.norms == "float16":
            half += [(m, a) for m in model.modules() if isinstance(m, NORMS) for a in ("weight", "bias")]
        hold_half(model, half)
        hold_grid(model, biases * (self.cfg.bias == "int8"))
        fit(model, ctx.train_loader(self.cfg.finetune.batch_size), self.cfg.finetune, loss_fn=ctx.loss,
            on_epoch=ctx.epoch_callback(model))
        for m in done:  # QAT may have moved more weights onto level 0: keep them there too
            pin_zeros(m)
        return model
