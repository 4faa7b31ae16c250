"""Stage `quantize`: uniform weight quantization, w_q = round(W / s) + z, on a per-layer grid.

Symmetric (z = 0, levels -(2^(b-1)-1)..2^(b-1)-1) or asymmetric (levels
0..2^b-1, with an integer zero point z so that 0.0 stays exact and pruned
zeros stay zeros). Per-tensor or per-output-channel scales (the output axis of
each layout: axis 1 for transformers' Conv1D, one scale per token for an
Embedding); bits per layer by name or glob (mixed precision). `step: s` sets
the grid step to s x the std of the layer's non-zero weights instead of
spreading 2^bits levels over the range (entropy-constrained scalar
quantization: the artifact entropy-codes the levels, so a finer step costs
bits, a wider `bits` grid does not). `layers: {TABLE: {frequency_prior: p}}` gives a token-embedding
table a step per row by how often data.train uses the row's token (lwpipe/frequency.py). On a shared layer
it quantizes the codebook,
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
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from lwpipe import frequency
from lwpipe.bits_auto import (  # noqa: F401  (kept_count, auto_candidates: re-exported)
    auto_candidates,
    kept_count,
    plan_bits,
    report_allotment,
)
from lwpipe.blockwise import Calibrator, calibration_batches
from lwpipe.calibration import task_forward
from lwpipe.constraints import (
    NORMS,
    check_layer_patterns,
    compressible_layers,
    hold_grid,
    hold_half,
    kept_kinds,
    layer_setting,
    tied_layers,
)
from lwpipe.context import Context
from lwpipe.errors import ConfigError
from lwpipe.grid import (  # noqa: F401  (re-exported: the stage's math, by its old names)
    CLIP_FACTORS,
    Scheme,
    binarize_layer,
    binary_scale,
    gptq_levels,
    group_grid,
    grouped_layer,
    pin_zeros,
    quant_grid,
    quant_range,
    quantize_layer,
    row_grid,
    rows_group_grid,
    std_grid,
)
from lwpipe.metrics import evaluate
from lwpipe.settings import CalibrationSettings, LayerQuant, Strict, TrainSettings
from lwpipe.stages.base import Stage
from lwpipe.stages.quantize_checks import (
    check_auto,
    check_binary,
    check_clip,
    check_full_range,
    check_gptq,
    check_group,
)
from lwpipe.stages.registry import register
from lwpipe.training import finetune

log = logging.getLogger("lwpipe")


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


@register("quantize")
class Quantize(Stage):
    Config = QuantizeConfig
    leaves = ("grid",)
    needs_reference = False  # one-shot unless it fine-tunes or allots bits (bits: auto evaluates the task)

    @classmethod
    def trains_with(cls, cfg: QuantizeConfig) -> bool:
        return cfg.finetune.epochs > 0

    @classmethod
    def needs_gradients_with(cls, cfg: QuantizeConfig) -> bool:
        return cfg.bits == "auto"

    @classmethod
    def needs_calibration_with(cls, cfg: QuantizeConfig) -> bool:
        """GPTQ's Hessians and frequency_prior's token counts come from data.train."""
        return cfg.method == "gptq" or any(lc.frequency_prior is not None for lc in cfg.layers.values())

    @classmethod
    def refuses_with(cls, cfg: QuantizeConfig) -> dict[str, str]:
        """What a codebook an earlier stage left rules out: GPTQ, per-channel scales, binary / ternary weights."""
        binary = cfg.bits == 1 or cfg.scheme == "ternary" or any(lc.bits == 1 for lc in cfg.layers.values())
        if cfg.method == "gptq":
            why = "method=gptq after share: a shared layer's values are its codebook, which has no input Hessian "
            return {"codebook": why + "to minimise against; use method: rtn after share, or drop share"}
        if cfg.granularity == "per_channel":
            why = (
                "granularity=per_channel after share: a shared layer has one codebook for the whole tensor, "
                "and per-channel scales would give each channel its own values (more than 2^bits per layer); "
            )
            return {"codebook": why + "use granularity=per_tensor, which quantizes the codebook itself"}
        if binary or (cfg.bits == "auto" and 1 in (cfg.candidates or ())):
            why = "binary / ternary weights (bits=1, candidates with 1, scheme=ternary) are their own 2- or 3-value "
            return {"codebook": why + "codebook; a k-means codebook before them only costs index bits: drop share"}
        return cls.refuses

    @staticmethod
    def check_model(cfg: QuantizeConfig, model: nn.Module, path: str) -> None:
        check_layer_patterns(model, cfg.layers, path)
        for name, m in compressible_layers(model):
            lc = layer_setting(name, cfg.layers)
            if lc is not None and lc.frequency_prior is not None and not lc.skip:
                step = lc.step if lc.step is not None else cfg.step
                key = frequency_key(path, cfg.layers, lc)
                frequency.check_table(name, m, key, step, cfg.granularity == "per_channel")

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
                bits = plan["bits"][name] if auto else lc.bits
                step = self.layer_step(name, m, lc, ctx, bits or self.cfg.bits)
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
                error = quantize_any(m, bits, self.cfg, tied, step, hessian)
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
        finetune(model, ctx, self.cfg.finetune)
        for m in done:  # QAT may have moved more weights onto level 0: keep them there too (deferred: so they are)
            pin_zeros(m, defer=True)
        return model

    def layer_step(self, name: str, m: nn.Module, lc: LayerQuant, ctx: Context, bits):
        """The layer's grid step: its own or the stage's; with frequency_prior, one per token row by its use in
        data.train (lwpipe/frequency.py), none so fine that its row clips at `bits`, summarised in the stage
        record."""
        step = lc.step if lc.step is not None else self.cfg.step
        if lc.frequency_prior is None or step is None:
            return step
        key = frequency_key(f"stages.{ctx.stage or 'quantize'}", self.cfg.layers, lc)
        counts = frequency.token_counts(ctx.data.train, m.weight.shape[0], key)
        steps = frequency.frequency_steps(counts, step, lc.frequency_prior)
        if bits > 1:  # bits 1: sign x alpha, no step
            scheme = "symmetric" if self.cfg.scheme == "ternary" else self.cfg.scheme
            steps = frequency.within_grid(steps, m.weight, bits, "symmetric_full" if self.cfg.full_range else scheme)
        ctx.stage_record.setdefault("frequency_steps", {})[name] = frequency.describe(counts, steps.reshape(-1))
        return steps

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
        layers = {n: m for n, m in compressible_layers(model) if n in names}
        batches = calibration_batches(ctx, self.calibration(), self.cfg.finetune.batch_size or ctx.batch_size)
        hs, seen = self.calibrator.supported_hessians(layers, batches, task_forward(ctx), lambda: no_data(ctx))
        if hs:
            log.info("  gptq: input Hessians of %d layers from %d calibration batches", len(hs), seen)
        return hs

    def quantizer(self, lc: LayerQuant):
        """How the stage puts one layer on a b-bit grid (its scheme, granularity and step), for sensitivities."""
        step = lc.step if lc.step is not None else self.cfg.step
        return lambda layer, bits: quantize_any(layer, bits, self.cfg, (), step)

    def allot(self, model: nn.Module, ctx: Context, settings: dict[str, LayerQuant]) -> dict:
        """bits: auto's plan (lwpipe/bits_auto.py): bits per layer from the sensitivities, under the budget."""
        return plan_bits(model, ctx, self.cfg, settings, self.quantizer)


def no_data(ctx: Context) -> ConfigError:
    return ConfigError(
        f"stages.{ctx.stage or 'quantize'}.method",
        "gptq",
        "needs calibration batches (the layers' input Hessians), and data.train gives none; use method: rtn",
    )


def frequency_key(path: str, layers: dict[str, LayerQuant], lc: LayerQuant) -> str:
    """The key path of a `layers:` entry's frequency_prior, by the name or glob it is set under."""
    return f"{path}.layers.{next(p for p, v in layers.items() if v is lc)}.frequency_prior"


def report_gptq(errors: dict[str, float], rounded: list[str], ctx: Context) -> None:
    """GPTQ's per-layer weighted error into the stage record; layers it could not take were rounded."""
    ctx.stage_record.update({"gptq_error": errors, "gptq_rounded_layers": rounded})
    if rounded:
        log.info("  gptq: rounded to nearest (no input activation GPTQ can use): %s", ", ".join(rounded))
