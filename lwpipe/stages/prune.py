"""Stage `prune`: set weights to zero behind a mask that every later stage keeps.

Criteria: `magnitude` (|w|; with `quality`, Deep Compression's rule
threshold = quality x std of the layer's weights) and `taylor`
(|w * dL/dw| summed over calibration batches). Granularity: unstructured,
structured (whole output rows / channels) or N:M. Ranking per layer or
global. One-shot, or gradual over `steps` with the cubic schedule of
Zhu & Gupta (2017), fine-tuning after each step.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from lwpipe import structured
from lwpipe.bn import recalibrate_bn
from lwpipe.config import Strict, TrainSettings
from lwpipe.constraints import compressible_layers, ensure_constraint, layer_setting, original_weight, check_layer_patterns
from lwpipe.context import Context
from lwpipe.registry import register
from lwpipe.training import fit

log = logging.getLogger("lwpipe")


class LayerPrune(Strict):
    sparsity: float | None = Field(None, ge=0, lt=1)
    quality: float | None = Field(None, gt=0, le=100)
    skip: bool = False


class PruneConfig(Strict):
    criterion: Literal["magnitude", "taylor"] = "magnitude"
    granularity: Literal["unstructured", "structured", "nm"] = "unstructured"
    sparsity: float = Field(0.5, ge=0, lt=1)
    quality: float | None = Field(None, gt=0, le=100)  # set: threshold = quality * std(W), per layer
    n: int = Field(2, ge=1, le=64)                       # N:M keeps n of every m consecutive weights
    m: int = Field(4, ge=2, le=64)
    scope: Literal["layer", "global"] = "layer"
    layers: dict[str, LayerPrune] = {}                   # by module name or glob: "fc3", "conv*"
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    steps: int = Field(1, ge=1, le=1000)
    calibration_batches: int = Field(8, ge=1, le=100_000)
    untraceable: Literal["error", "mask"] = "error"      # structured on a model torch.fx cannot trace
    finetune: TrainSettings = TrainSettings()            # after each pruning step

    @model_validator(mode="after")
    def _consistent(self):
        if self.granularity == "nm" and self.n >= self.m:
            raise ValueError(f"n={self.n} must be smaller than m={self.m} (keep n of every m)")
        if self.scope == "global" and self.granularity != "unstructured":
            raise ValueError(f"scope=global ranks single weights; use it with granularity=unstructured, "
                             f"not {self.granularity}")
        if self.quality is not None and (self.criterion != "magnitude" or self.scope != "layer"):
            raise ValueError("quality (threshold = quality x std) needs criterion=magnitude and scope=layer")
        if self.schedule == "gradual" and self.granularity == "nm":
            raise ValueError("N:M sparsity is fixed by n and m; use schedule=oneshot")
        return self


# -- scores and masks: pure functions ------------------------------------------------
def taylor_scores(model: nn.Module, batches, layers: list[nn.Module]) -> list[torch.Tensor]:
    """sum over batches of |w * dL/dw| for each layer's effective weight."""
    scores = [torch.zeros_like(m.weight) for m in layers]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for x, y in batches:
        with parametrize.cached():
            ws = [m.weight for m in layers]
            live = [w for w in ws if w.requires_grad]
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            grads = iter(torch.autograd.grad(loss, live, allow_unused=True) if live else [])
        for s, w in zip(scores, ws):
            g = next(grads) if w.requires_grad else None
            if g is not None:
                s += (w.detach() * g).abs()
    model.train(was_training)
    return scores


def lowest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the round(sparsity * n) lowest scores (ties broken by position)."""
    k = int(round(sparsity * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        mask[torch.argsort(scores.flatten(), stable=True)[:k]] = False
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Structured: drop whole output rows / channels with the lowest summed score."""
    row = scores.flatten(1).sum(1)
    keep = lowest_mask(row, sparsity)
    return keep.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores).clone()


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in each group of m consecutive weights along the input dim, keep the n largest."""
    flat = scores.flatten(1)
    cols = flat.shape[1]
    pad = (-cols) % m
    groups = F.pad(flat, (0, pad), value=float("-inf")).view(flat.shape[0], -1, m)  # padding is never kept
    keep_idx = groups.topk(n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep_idx, True)
    return mask.view(flat.shape[0], -1)[:, :cols].reshape(scores.shape)


def cubic_schedule(initial: float, final: float, t: int, steps: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - t/steps)^3."""
    return final + (initial - final) * (1 - t / steps) ** 3


# -- the stage ------------------------------------------------------------------------
@register("prune")
class Prune:
    Config = PruneConfig
    compresses = True

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    @staticmethod
    def check_order(cfg: PruneConfig, before) -> str | None:
        if cfg.granularity == "structured" and any(s.type in ("share", "quantize") for s in before):
            return ("granularity=structured shrinks layers, which a codebook or grid cannot follow; "
                    "prune before share/quantize")
        return None

    @staticmethod
    def check_model(cfg: PruneConfig, model: nn.Module, path: str) -> None:
        check_layer_patterns(model, cfg.layers, path)
        if cfg.granularity == "structured":  # shrinks layers: the graph must trace (lwpipe/structured.py)
            structured.check(model, path, cfg.untraceable)

    def _targets(self, layers: dict[str, nn.Module]) -> dict[str, float]:
        """Final sparsity per layer (quality thresholds turned into the sparsity they give)."""
        out = {}
        for name, m in layers.items():
            lc = layer_setting(name, self.cfg.layers, LayerPrune())
            if lc.skip:
                continue
            quality = lc.quality if lc.quality is not None else (None if lc.sparsity is not None else self.cfg.quality)
            if quality is not None:
                w = m.weight.detach()
                out[name] = float((w.abs() < quality * w.std()).float().mean())
            else:
                out[name] = lc.sparsity if lc.sparsity is not None else self.cfg.sparsity
        return out

    @torch.no_grad()
    def _prune_to(self, model, ctx: Context, layers: dict[str, nn.Module], targets: dict[str, float]) -> None:
        names = list(targets)
        mods = [layers[n] for n in names]
        if self.cfg.criterion == "taylor":
            with torch.enable_grad():
                scores = taylor_scores(model, ctx.calibration_batches(self.cfg.calibration_batches), mods)
        else:
            scores = [m.weight.detach().abs() for m in mods]
        for i, m in enumerate(mods):  # already-pruned weights rank lowest, so the mask only shrinks
            c = ensure_constraint(m)
            if c.mask is not None:
                scores[i] = torch.where(c.mask, scores[i], torch.full_like(scores[i], -1.0))
        explicit = {n for n in names if layer_setting(n, self.cfg.layers, LayerPrune()).sparsity is not None}
        if self.cfg.scope == "global":
            pooled = [i for i, n in enumerate(names) if n not in explicit]
            if pooled:
                total = sum(scores[i].numel() for i in pooled)
                target = sum(targets[names[i]] * scores[i].numel() for i in pooled) / total
                flat = lowest_mask(torch.cat([scores[i].flatten() for i in pooled]), target)
                for i, part in zip(pooled, flat.split([scores[i].numel() for i in pooled])):
                    self._apply(mods[i], part.view_as(scores[i]))
        for i, n in enumerate(names):
            if self.cfg.scope == "global" and n not in explicit:
                continue
            if self.cfg.granularity == "nm":
                mask = nm_mask(scores[i], self.cfg.n, self.cfg.m)
            elif self.cfg.granularity == "structured":
                mask = row_mask(scores[i], targets[n])
            else:
                mask = lowest_mask(scores[i], targets[n])
            self._apply(mods[i], mask)

    @staticmethod
    def _apply(module: nn.Module, mask: torch.Tensor) -> None:
        c = ensure_constraint(module)
        c.set_mask(mask)
        if not c.shared:
            original_weight(module).mul_(c.mask)  # keep the stored weights honest too

    def run(self, model: nn.Module, ctx: Context) -> nn.Module:
        if self.cfg.granularity == "structured" and structured.traceable(model):
            return structured.run(self, model, ctx)
        layers = dict(compressible_layers(model))
        finals = self._targets(layers)
        initial = {n: float((layers[n].weight == 0).float().mean()) for n in finals}
        steps = self.cfg.steps if self.cfg.schedule == "gradual" else 1
        for t in range(1, steps + 1):
            targets = {n: max(initial[n], cubic_schedule(initial[n], finals[n], t, steps)) for n in finals}
            self._prune_to(model, ctx, layers, targets)
            recalibrate_bn(model, ctx.calibration_batches(self.cfg.calibration_batches))  # no-op without BN
            if steps > 1:
                log.info("  prune step %d/%d: target sparsity %s", t, steps,
                         ", ".join(f"{n}={v:.3f}" for n, v in targets.items()))
            fit(model, ctx.train_loader(self.cfg.finetune.batch_size), self.cfg.finetune,
                on_epoch=ctx.epoch_callback(model))
        return model
