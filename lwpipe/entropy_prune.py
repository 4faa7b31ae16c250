"""`prune.criterion: entropy`, unstructured: the prune stage's path through sparse variational dropout.

    for each step (1, or `steps` with schedule: gradual):
        train with a posterior per weight (lwpipe/variational.py) for `variational.epochs`
        mask: score <= threshold (or, with sparsity, all but the highest-scoring fraction)
        fine-tune the plain masked model for `finetune.epochs`

The posteriors exist only inside the variational training; the model leaves as it came, plus masks.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lwpipe.bn import recalibrate_bn
from lwpipe.constraints import compressible_layers, constraint, ensure_constraint, original_weight, tied_layers
from lwpipe.errors import ConfigError
from lwpipe.training import finetune, fit
from lwpipe.variational import kl_schedule, train_variational, unsupported_layer

log = logging.getLogger("lwpipe")
DEFAULT_THRESHOLD = 3.0  # log alpha = 3 (alpha ~ 20): Molchanov et al.'s threshold


def threshold_of(cfg) -> float | None:
    """The threshold in force: the given one; else 3.0 unless `sparsity` was given."""
    if cfg.threshold is not None:
        return cfg.threshold
    return None if "sparsity" in cfg.model_fields_set else DEFAULT_THRESHOLD


def settle_threshold(cfg, overrides) -> None:
    """criterion=entropy takes `threshold` or `sparsity`, not both. One given on the command line replaces the
    other where only the recipe set it (the default recipe's sparsity under `++stages.prune.threshold=3.0`);
    both given anywhere else is refused when the stage's settings are validated."""
    from omegaconf import DictConfig, open_dict

    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    for name, s in (cfg.get("stages") or {}).items():
        if not isinstance(s, DictConfig) or s.get("criterion") != "entropy":
            continue
        for key, other in (("threshold", "sparsity"), ("sparsity", "threshold")):
            mine, theirs = f"stages.{name}.{key}" in given, f"stages.{name}.{other}" in given
            if mine and not theirs and other in s:
                with open_dict(s):
                    del s[other]


def check_layers(cfg, model: nn.Module, path: str) -> None:
    """Before any work: every layer entropy pruning would parametrize is one it can."""
    for name, m in compressible_layers(model):
        if layer_skipped(cfg, name):
            continue
        why = unsupported_layer(m)
        if why:
            raise ConfigError(
                f"{path}.criterion",
                "entropy",
                f"cannot parametrize layer {name}: {why}; leave it out with {path}.layers={{{name}: {{skip: true}}}}",
            )


def layer_skipped(cfg, name: str) -> bool:
    from lwpipe.constraints import layer_setting

    return getattr(layer_setting(name, cfg.layers), "skip", False)


def _masks(
    cfg, scores: dict[str, torch.Tensor], layers: dict, eps: float | None, targets: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Every mask first: a layer emptied by the threshold is refused before any layer changes."""
    from lwpipe.masks import lowest_mask

    masks = {}
    for n, s in scores.items():
        c = constraint(layers[n])
        if c is not None and c.mask is not None:  # already pruned: highest score, goes first, stays gone
            s = s.masked_fill(~c.mask, float("inf"))
        if n in targets:
            masks[n] = lowest_mask(-s, targets[n])
            continue
        masks[n] = s <= eps
        if not bool(masks[n].any()):
            live = s[torch.isfinite(s)]
            lo, hi = (float(live.min()), float(live.max())) if live.numel() else (float("nan"),) * 2
            raise ConfigError(
                "stages.prune.threshold",
                eps,
                f"removes every weight of layer {n} after variational training (its {cfg.score} "
                f"scores range over [{lo:.4g}, {hi:.4g}]); a layer may never be pruned to nothing: "
                f"use a threshold of at least {lo:.4g}, or give {n} its own sparsity under layers",
            )
    return masks


@torch.no_grad()
def clear_dead_units(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """A unit whose every outgoing weight is pruned computes nothing that is read: mask its incoming weights
    and zero its bias (the model's outputs do not change; the artifact stores fewer weights and a zero).
    Channels are followed through the dependency graph of lwpipe/structured.py; untraceable models: nothing.
    Returns producer layer -> units cleared."""
    from lwpipe import structured

    if not structured.traceable(model):
        return {}
    modules, cleared = dict(model.named_modules()), {}
    for group in structured.channel_groups(model, example):
        read = None
        for name, per in group.consumers:
            w = modules[name].weight
            used = (w != 0).transpose(0, 1).reshape(w.shape[1] // per, -1).any(1)  # per input channel
            read = used if read is None else read | used
        if read is None or bool(read.all()):
            continue
        for name in group.producers:
            m = modules[name]
            mask = (m.weight != 0) & read.view(-1, *[1] * (m.weight.dim() - 1))
            if not bool(mask.any()):  # never empty a layer: its bias alone still reaches the output
                continue
            stage_apply(m, mask)
            if m.bias is not None:
                stored_bias(m)[~read] = 0
            cleared[name] = int((~read).sum())
    return cleared


def stored_bias(m: nn.Module) -> torch.Tensor:
    from torch.nn.utils import parametrize

    return m.parametrizations.bias.original if parametrize.is_parametrized(m, "bias") else m.bias


def stage_apply(module: nn.Module, mask: torch.Tensor) -> None:
    c = ensure_constraint(module)
    c.set_mask(mask if c.mask is None else c.mask & mask)
    if not c.shared:
        original_weight(module).mul_(c.mask)


def run(stage, model: nn.Module, ctx) -> nn.Module:
    from lwpipe.masks import cubic_schedule

    cfg = stage.cfg
    ties = tied_layers(model)
    layers = {n: m for n, m in compressible_layers(model) if not stage._setting(n, ties).skip}
    eps = threshold_of(cfg)
    sparsities = {n: stage._setting(n, ties).sparsity for n in layers}
    finals = {n: s if s is not None else cfg.sparsity for n, s in sparsities.items() if s is not None or eps is None}
    initial = {n: 1 - int(torch.count_nonzero(layers[n].weight)) / layers[n].weight.numel() for n in finals}
    loader = ctx.train_loader(cfg.variational.batch_size)
    kl_at = kl_schedule(cfg.kl_weight, cfg.kl_warmup * len(loader))
    steps = cfg.steps if cfg.schedule == "gradual" else 1
    for n, m in layers.items():
        ensure_constraint(m, ties.get(n, ()))
    step = 0

    def train(loss, groups):
        fit(model, loader, cfg.variational, loss_fn=loss, hooks=ctx.hooks(model), params=groups)

    for t in range(1, steps + 1):
        scores, step = train_variational(
            model, layers, train, ctx.loss, len(ctx.data.train), kl_at, cfg.score, cfg.sigma_lr, step
        )
        targets = {n: max(initial[n], cubic_schedule(initial[n], f, t, steps)) for n, f in finals.items()}
        masks = _masks(cfg, scores, layers, eps, targets)
        cutoffs = {n: (eps if n not in targets else float(scores[n][masks[n]].max())) for n in masks}
        with torch.no_grad():
            for n, mask in masks.items():
                stage._apply(layers[n], mask)
        dead = clear_dead_units(model, ctx.test_loader()[0][0][:2].to(ctx.device)) if cfg.dead_units else {}
        kept = {n: int(torch.count_nonzero(layers[n].weight)) / layers[n].weight.numel() for n in masks}
        log.info(
            "  entropy prune step %d/%d (%s): kept %s; units with no weight out cleared: %s",
            t,
            steps,
            cfg.score,
            ", ".join(f"{n}={v:.4f}" for n, v in kept.items()),
            dead or "none",
        )
        recalibrate_bn(model, ctx.calibration_batches(cfg.calibration_batches))
        finetune(model, ctx, cfg.finetune)
    ctx.stage_record.update(entropy_score=cfg.score, entropy_threshold=cutoffs, kept_fraction=kept, dead_units=dead)
    return model
