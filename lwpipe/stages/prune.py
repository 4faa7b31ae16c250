"""Stage `prune`: set weights to zero behind a mask that every later stage keeps.

Criteria: `magnitude` (|w|; with `quality`, Deep Compression's rule
threshold = quality x std of the layer's weights), `taylor`
(|w * dL/dw| summed over calibration batches), `gradient` (|dL/dw| summed over
calibration batches), `saliency` (Optimal Brain Damage, LeCun et al. 1990:
1/2 F_ii w_i^2, the diagonal empirical Fisher F_ii = mean over batches of
(dL/dw_i)^2 standing in for the Hessian) and `wanda` (Sun et al. 2023:
|w| x the L2 norm of its input channel's activations over calibration batches,
compared within each output row; an Embedding has no input activation and
falls back to magnitude). Granularity: unstructured, structured (whole output
rows / channels; Embedding: whole tokens) or N:M along the input dimension.
Ranking per layer or global. One-shot, or gradual over `steps` with the cubic
schedule of Zhu & Gupta (2017), fine-tuning after each step.
`sparsegpt` (Frantar & Alistarh 2023) drops the weights with the lowest w^2 / [H^-1]_jj^2 of the layer's
input Hessian and updates the kept ones to make up for them (lwpipe/gptq.py); unstructured or N:M, per layer,
block by block with `calibration.sequential` (lwpipe/stages/prune_sparsegpt.py).
`threshold: eps` (unstructured, one-shot) prunes every weight whose score is below eps
instead of a target sparsity; the sparsity it reaches is logged.
`entropy` (sparse variational dropout, lwpipe/entropy_prune.py; structured: activation entropy) prunes
the weights whose score is *above* `threshold` (default 3.0), or the highest-scoring `sparsity`.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lwpipe import entropy_prune, structured
from lwpipe.bn import recalibrate_bn
from lwpipe.calibration import input_channel_norms, task_forward
from lwpipe.constraints import (
    check_layer_patterns,
    compressible_layers,
    constraint,
    ensure_constraint,
    in_axis,
    kept_kinds,
    layer_setting,
    original_weight,
    out_axis,
    tied_layers,
)
from lwpipe.context import Context
from lwpipe.errors import ConfigError
from lwpipe.masks import (  # noqa: F401  (re-exported: the stage's math, by its old names)
    cubic_schedule,
    lowest_mask,
    nm_mask,
    row_lowest_mask,
    row_mask,
    threshold_mask,
)
from lwpipe.scoring import gradient_scores, magnitude_scores, taylor_scores, wanda_scores
from lwpipe.settings import CalibrationSettings, LayerPrune, Strict, TrainSettings
from lwpipe.stages import prune_sparsegpt
from lwpipe.stages.base import Stage
from lwpipe.stages.prune_checks import check_not_emptied, check_sparsegpt, check_threshold
from lwpipe.stages.registry import register
from lwpipe.training import finetune

log = logging.getLogger("lwpipe")


class PruneConfig(Strict):
    criterion: Literal["magnitude", "taylor", "wanda", "gradient", "saliency", "sparsegpt", "entropy"] = "magnitude"
    granularity: Literal["unstructured", "structured", "nm"] = "unstructured"
    sparsity: float = Field(0.5, ge=0, lt=1)
    quality: float | None = Field(None, gt=0, le=100)  # set: threshold = quality * std(W), per layer
    threshold: float | None = Field(None, ge=-1e30, le=1e30)  # set: prune scores below it (entropy: above)
    n: int = Field(2, ge=1, le=64)  # N:M keeps n of every m consecutive weights
    m: int = Field(4, ge=2, le=64)
    scope: Literal["layer", "global"] = "layer"
    layers: dict[str, LayerPrune] = {}  # by module name or glob: "fc3", "conv*"
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    steps: int = Field(1, ge=1, le=1000)
    calibration_batches: int = Field(8, ge=1, le=100_000)  # taylor, gradient, saliency and wanda statistics
    untraceable: Literal["error", "mask"] = "error"  # structured on a model torch.fx cannot trace
    keep: list[Literal["embeddings", "output_head"]] = []  # layer kinds left unpruned (a `layers` entry overrides)
    damp: float = Field(0.01, gt=0, le=1)  # sparsegpt: H + damp x mean(diag H) x I
    calibration: CalibrationSettings | None = None  # sparsegpt: the top-level samples / seq_len (config.validate)
    block: int = Field(128, ge=1, le=1 << 20)  # sparsegpt: columns whose mask is chosen together
    finetune: TrainSettings = TrainSettings()  # after each pruning step
    # criterion=entropy (lwpipe/variational.py): score, KL weight and its warm-up (epochs), the variational
    # training before each pruning step (its own lr for log sigma^2: sigma_lr), histogram bins (structured)
    score: Literal["log_alpha", "entropy"] = "log_alpha"
    kl_weight: float = Field(1.0, ge=0, le=1e6)
    kl_warmup: int = Field(0, ge=0, le=100_000)
    variational: TrainSettings = TrainSettings(epochs=10)
    sigma_lr: float | None = Field(None, gt=0, le=10)
    bins: int = Field(32, ge=2, le=1 << 16)
    dead_units: bool = True  # entropy: clear units whose outgoing weights are all pruned (outputs unchanged)

    @model_validator(mode="after")
    def _consistent(self):
        if self.granularity == "nm" and self.n >= self.m:
            raise ValueError(f"n={self.n} must be smaller than m={self.m} (keep n of every m)")
        if self.criterion == "wanda" and self.scope == "global":
            raise ValueError("criterion=wanda compares weights within each output row of a layer; use scope=layer")
        if self.scope == "global" and self.granularity != "unstructured":
            raise ValueError(
                f"scope=global ranks single weights; use it with granularity=unstructured, not {self.granularity}"
            )
        if self.quality is not None and (self.criterion != "magnitude" or self.scope != "layer"):
            raise ValueError("quality (threshold = quality x std) needs criterion=magnitude and scope=layer")
        if self.schedule == "gradual" and self.granularity == "nm":
            raise ValueError("N:M sparsity is fixed by n and m; use schedule=oneshot")
        if self.threshold is not None:
            check_threshold(self)
        check_sparsegpt(self)
        if self.criterion == "entropy" and (self.granularity == "nm" or self.untraceable == "mask"):
            raise ValueError(
                "criterion=entropy scores single weights (unstructured) or traced channels "
                "(structured, untraceable=error); not N:M groups or masked rows"
            )
        if self.criterion == "entropy" and self.scope == "global":
            raise ValueError("criterion=entropy scores each layer's weights by its own posteriors; use scope=layer")
        if self.criterion == "entropy" and self.threshold is not None and "sparsity" in self.model_fields_set:
            raise ValueError(
                f"threshold={self.threshold!r} and sparsity={self.sparsity!r} both say what goes; give one of them"
            )
        return self


# -- the stage ------------------------------------------------------------------------
NO_DATA = (
    "needs calibration data (input activations or gradients), and the training set gives no batch; "
    "use criterion=magnitude or give data.train"
)


def _has_batches(ctx: Context) -> bool:
    train = getattr(getattr(ctx, "data", None), "train", None)
    return train is not None and (not hasattr(train, "__len__") or len(train) > 0)


@register("prune")
class Prune(Stage):
    Config = PruneConfig
    leaves = ("mask", "resized")  # resized: granularity=structured shrinks layers
    needs_reference = False  # one-shot unless it fine-tunes or scores by task-loss gradients

    def __init__(self, cfg: PruneConfig):
        super().__init__(cfg)
        self._kept: set[str] = set()  # names `keep` leaves alone, found when the stage runs

    @staticmethod
    def check_order(cfg: PruneConfig, before) -> str | None:
        from lwpipe.stages.factorize import warn_factor_pruning

        by_rule = cfg.quality is not None or cfg.threshold is not None
        sparsity = 1 - cfg.n / cfg.m if cfg.granularity == "nm" else cfg.sparsity
        warn_factor_pruning(None if by_rule else sparsity, cfg.layers, before)
        return None

    @classmethod
    def refuses_with(cls, cfg: PruneConfig) -> dict[str, str]:
        """sparsegpt moves the weights it keeps, and structured pruning shrinks layers: neither follows a
        codebook or grid."""
        if cfg.criterion == "sparsegpt":
            why = "criterion=sparsegpt moves the weights it keeps, off a codebook or grid an earlier stage left; "
            return dict.fromkeys(("codebook", "grid"), why + "prune with sparsegpt before share/quantize")
        if cfg.granularity == "structured":
            why = "granularity=structured shrinks layers, which a codebook or grid cannot follow; "
            return dict.fromkeys(("codebook", "grid"), why + "prune before share/quantize")
        return cls.refuses

    @classmethod
    def trains_with(cls, cfg: PruneConfig) -> bool:
        return cfg.finetune.epochs > 0

    @classmethod
    def needs_gradients_with(cls, cfg: PruneConfig) -> bool:
        return cfg.criterion in ("taylor", "gradient", "saliency")

    @classmethod
    def needs_calibration_with(cls, cfg: PruneConfig) -> bool:
        return cfg.criterion != "magnitude"

    @staticmethod
    def check_model(cfg: PruneConfig, model: nn.Module, path: str) -> None:
        check_layer_patterns(model, cfg.layers, path)
        check_not_emptied(cfg, model, path)
        if cfg.criterion == "entropy" and cfg.granularity == "unstructured":
            entropy_prune.check_layers(cfg, model, path)
        if cfg.granularity == "structured":  # shrinks layers: the graph must trace (lwpipe/structured.py)
            structured.check(model, path, cfg.untraceable)

    @staticmethod
    def check_context(cfg: PruneConfig, ctx: Context, path: str) -> None:
        """Before any stage runs (for a runner that calls it): calibration data exists where the criterion needs it."""
        if cfg.criterion != "magnitude" and not _has_batches(ctx):
            raise ConfigError(f"{path}.criterion", cfg.criterion, NO_DATA)

    def _setting(self, name: str, ties: dict) -> LayerPrune:
        default = LayerPrune(skip=name in self._kept)
        return layer_setting(name, self.cfg.layers, default, [t for t, _ in ties.get(name, ())])

    def _targets(self, layers: dict[str, nn.Module], ties: dict) -> dict[str, float]:
        """Final sparsity per layer (quality thresholds turned into the sparsity they give)."""
        out = {}
        for name, m in layers.items():
            lc = self._setting(name, ties)
            if lc.skip:
                continue
            quality = lc.quality if lc.quality is not None else (None if lc.sparsity is not None else self.cfg.quality)
            if quality is not None:
                w = m.weight.detach()
                out[name] = float((w.abs() < quality * w.std()).float().mean())
            else:
                out[name] = lc.sparsity if lc.sparsity is not None else self.cfg.sparsity
        return out

    def _calibrate(self, model, ctx: Context, mods: dict[str, nn.Module]):
        """Taylor: the scores themselves; wanda: per-layer input channel norms. Refuses empty calibration data."""
        if self.cfg.criterion == "magnitude":
            return None, None
        if not _has_batches(ctx):
            raise self._no_data()
        batches = ctx.calibration_batches(self.cfg.calibration_batches)
        if self.cfg.criterion == "taylor":
            with torch.enable_grad():
                return dict(zip(mods, taylor_scores(model, batches, list(mods.values()), ctx.loss))), None
        if self.cfg.criterion in ("gradient", "saliency"):
            with torch.enable_grad():
                scores = gradient_scores(model, batches, list(mods.values()), ctx.loss, self.cfg.criterion)
            return dict(zip(mods, scores)), None
        if self.cfg.criterion == "wanda":
            norms, seen = input_channel_norms(model, mods, batches, task_forward(ctx))
            if not seen:
                raise self._no_data()
            unseen = [n for n, m in mods.items() if n not in norms and in_axis(m) is not None]
            if unseen:  # e.g. a layer whose weight is used without calling the module (MultiheadAttention)
                log.info("  wanda: no input activation reached %s; ranked by magnitude", ", ".join(unseen))
            return None, norms
        return None, None

    def _no_data(self) -> ConfigError:
        return ConfigError("stages.prune.criterion", self.cfg.criterion, NO_DATA)

    def _score(self, name: str, m: nn.Module, taylor, norms) -> torch.Tensor:
        if taylor is not None:
            s = taylor.pop(name)
        elif norms is not None and name in norms:
            s = wanda_scores(m, norms[name])
        else:  # magnitude; and wanda's fallback for Embedding, which has no input activation
            s = magnitude_scores(m)
        c = constraint(m)
        if c is not None and c.mask is not None:  # already-pruned weights rank lowest, so the mask only shrinks
            s = s.masked_fill_(~c.mask, -1.0)  # s is a fresh tensor
        return s.float()  # a bf16 / fp16 layer's scores ranked in float32 (numpy has no bf16)

    @torch.no_grad()
    def _prune_to(
        self, model, ctx: Context, layers: dict[str, nn.Module], targets: dict[str, float], ties: dict
    ) -> None:
        names = list(targets)
        if self.cfg.criterion == "sparsegpt":  # group by group: the Hessians through the layers pruned before
            for n in names:
                ensure_constraint(layers[n], ties.get(n, ()))
            if not _has_batches(ctx):
                raise self._no_data()
            return prune_sparsegpt.prune(self, model, ctx, layers, targets)
        taylor, norms = self._calibrate(model, ctx, {n: layers[n] for n in names})
        for n in names:
            ensure_constraint(layers[n], ties.get(n, ()))
        explicit = {n for n in names if self._setting(n, ties).sparsity is not None}
        if self.cfg.threshold is not None:
            self._prune_by_threshold(
                layers,
                [
                    n
                    for n in names
                    if self._setting(n, ties).sparsity is None and self._setting(n, ties).quality is None
                ],
                taylor,
                norms,
            )
            names = [n for n in names if n in explicit or self._setting(n, ties).quality is not None]
        pooled = [n for n in names if n not in explicit] if self.cfg.scope == "global" else []
        if pooled:
            scores = [self._score(n, layers[n], taylor, norms) for n in pooled]
            total = sum(s.numel() for s in scores)
            target = sum(targets[n] * s.numel() for n, s in zip(pooled, scores)) / total
            flat = lowest_mask(torch.cat([s.flatten() for s in scores]), target)
            for n, s, part in zip(pooled, scores, flat.split([s.numel() for s in scores])):
                part = part.view_as(s).clone()
                if not bool(part.any()):  # ranked against bigger layers, this one lost every weight
                    part.view(-1)[int(s.view(-1).argmax())] = True
                    log.warning(
                        "  prune scope=global removed every weight of %s; its highest-scoring weight is "
                        "kept (a layer may never be pruned to nothing): give %s its own sparsity under "
                        "layers",
                        n,
                        n,
                    )
                self._apply(layers[n], part)
        for n in names:  # one layer's scores at a time: memory stays near one model copy
            if n in pooled:
                continue
            m, by_row = layers[n], norms is not None and n in norms
            self._apply(m, self._mask(m, self._score(n, m, taylor, norms), targets[n], by_row))

    def _mask(self, m: nn.Module, score: torch.Tensor, target: float, by_row: bool = False) -> torch.Tensor:
        """The keep mask of `score` at sparsity `target` in the stage's granularity; `by_row`: Wanda compares
        weights within each output row."""
        if self.cfg.granularity == "nm":
            return nm_mask(score, self.cfg.n, self.cfg.m, in_axis(m) if in_axis(m) is not None else 1)
        if self.cfg.granularity == "structured":
            return row_mask(score, target, out_axis(m))
        return row_lowest_mask(score, target, out_axis(m)) if by_row else lowest_mask(score, target)

    def _prune_by_threshold(self, layers: dict[str, nn.Module], names: list[str], taylor, norms) -> None:
        """Every mask first, then apply: a threshold that empties a layer is refused before any layer changes."""
        eps = self.cfg.threshold
        masks = {}
        for n in names:
            score = self._score(n, layers[n], taylor, norms)
            masks[n] = threshold_mask(score, eps)
            if not bool(masks[n].any()):
                raise ConfigError(
                    "stages.prune.threshold",
                    eps,
                    f"prunes every weight of layer {n} (its highest {self.cfg.criterion} score is "
                    f"{float(score.max()):.4g}); a layer may never be pruned to nothing: use a "
                    f"threshold below that, or give {n} its own sparsity under layers",
                )
        for n, mask in masks.items():
            self._apply(layers[n], mask)
        reached = {n: 1 - int(torch.count_nonzero(layers[n].weight)) / layers[n].weight.numel() for n in names}
        log.info(
            "  prune threshold %g (%s): reached sparsity %s",
            eps,
            self.cfg.criterion,
            ", ".join(f"{n}={v:.3f}" for n, v in reached.items()),
        )

    @staticmethod
    def _apply(module: nn.Module, mask: torch.Tensor) -> None:
        c = ensure_constraint(module)
        c.set_mask(mask)
        if not c.shared:
            original_weight(module).mul_(c.mask)  # keep the stored weights honest too

    def run(self, model: nn.Module, ctx: Context) -> nn.Module:
        self._kept = kept_kinds(model, self.cfg.keep)
        if self.cfg.granularity == "structured" and structured.traceable(model):
            finals = self._targets(dict(compressible_layers(model)), tied_layers(model))
            return structured.run(self.cfg, model, ctx, finals)
        if self.cfg.criterion == "entropy":
            return entropy_prune.run(self, model, ctx)
        layers = dict(compressible_layers(model))
        ties = tied_layers(model)
        finals = self._targets(layers, ties)
        initial = {n: int(torch.count_nonzero(layers[n].weight == 0)) / layers[n].weight.numel() for n in finals}
        steps = self.cfg.steps if self.cfg.schedule == "gradual" else 1
        for t in range(1, steps + 1):
            targets = {n: max(initial[n], cubic_schedule(initial[n], finals[n], t, steps)) for n in finals}
            self._prune_to(model, ctx, layers, targets, ties)
            recalibrate_bn(model, ctx.calibration_batches(self.cfg.calibration_batches))  # no-op without BN
            if steps > 1:
                log.info(
                    "  prune step %d/%d: target sparsity %s",
                    t,
                    steps,
                    ", ".join(f"{n}={v:.3f}" for n, v in targets.items()),
                )
            finetune(model, ctx, self.cfg.finetune)
        return model
