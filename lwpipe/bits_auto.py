"""`quantize.bits: auto`'s bookkeeping: each layer's candidate widths, the budget in bits, the plan from the
sensitivities and the allotment (lwpipe/mixed_precision.py), and its report."""

from __future__ import annotations

import logging
import math

from torch import nn

from lwpipe.constraints import compressible_layers, constraint
from lwpipe.errors import ConfigError
from lwpipe.loggers.console import format_quality
from lwpipe.mixed_precision import DEFAULT_CANDIDATES, allot, sensitivities

log = logging.getLogger("lwpipe")


def auto_candidates(cfg, shared: bool) -> list[int]:
    """The widths bits: auto picks from for one layer: `candidates`, or the default less 1 where binary weights
    cannot be (scheme=asymmetric, a shared layer)."""
    if cfg.candidates is not None:
        return list(cfg.candidates)
    return [b for b in DEFAULT_CANDIDATES if b > 1 or not (shared or cfg.scheme == "asymmetric")]


def plan_bits(model: nn.Module, ctx, cfg, settings: dict, quantizer) -> dict:
    """bits: auto: the Fisher from calibration samples, Omega(l, b) per layer and candidate, then bits per
    layer (lwpipe/mixed_precision.py). A budget that cannot hold the fewest bits is a ConfigError, raised
    before any layer changes. Layers under `layers:` keep their bits (a skipped one counts 32 a weight).
    `quantizer(layer_settings)` says how the stage puts one layer on a b-bit grid."""
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
            [quantizer(settings[n]) for n in quantized],
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
        "spent_bits": sum(b * kept[n] for n, b in bits.items()) + sum(32 * kept[n] for n in layers if settings[n].skip),
        "predicted": 0.5 * sum(table[n][b] for n, b in bits.items()),
    }


def kept_count(module: nn.Module) -> int:
    """Weights the mask keeps (all of them without a mask)."""
    c = constraint(module)
    return int(c.mask.sum()) if c is not None and c.mask is not None else module.weight.numel()


def budget_error(cfg, path: str, least: float, total: int) -> ConfigError:
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


def report_allotment(plan: dict, before: dict, after: dict, ctx) -> None:
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
