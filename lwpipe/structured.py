"""Structured pruning that shrinks layers: `prune.granularity: structured`.

Removing output channel c of a convolution only makes the model smaller if c is
removed everywhere it flows: the BatchNorm after it, the input channels of the
layers that read it, and, through a residual addition, the same channel of
every other tensor added to it. As in Torch-Pruning's dependency graph
(Fang et al. 2023), the model is traced (torch.fx, with shapes from one example
batch) and its tensors' channel dimensions are grouped with a union-find (lwpipe/channel_graph.py,
which lists how each kind of node treats a channel space).

Each unblocked group with producers loses its lowest-scoring channels (summed
per-producer-normalised L2 norms of the output rows, or Taylor scores), and every
producer, BatchNorm and consumer gets smaller tensors: a smaller dense model.
`resize_to` rebuilds such shapes in a freshly built model (lwpipe.load, checkpoints).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.bn import recalibrate_bn
from lwpipe.channel_graph import (  # noqa: F401  (re-exported)
    LAYERS,
    NORMS,
    Group,
    Untraceable,
    channel_groups,
    trace,
    traceable,
)
from lwpipe.errors import ConfigError

log = logging.getLogger("lwpipe")


# -- shrinking -----------------------------------------------------------------------------------
def _replace(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(m, name)
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        m.register_buffer(name, value.detach().clone())


def _bake(m: nn.Module):
    """Plain weights for slicing; returns the old mask (or None) to put back, sliced."""
    from lwpipe.constraints import constraint

    c = constraint(m)
    if c is None:
        return None
    if c.shared or c.quantized:
        raise ValueError("a shared or quantized layer cannot be shrunk; prune structurally before share/quantize")
    mask = c.mask
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return mask


def _remask(m: nn.Module, mask) -> None:
    if mask is not None:
        from lwpipe.constraints import ensure_constraint

        ensure_constraint(m).set_mask(mask)


@torch.no_grad()
def shrink(model: nn.Module, group: Group, keep: torch.Tensor) -> None:
    """Keep only channels `keep` of the group in every tensor that carries them."""
    modules = dict(model.named_modules())
    for name in group.producers:
        m = modules[name]
        mask = _bake(m)
        _replace(m, "weight", m.weight[keep])
        if m.bias is not None:
            _replace(m, "bias", m.bias[keep])
        _remask(m, None if mask is None else mask[keep])
        if isinstance(m, nn.Linear):
            m.out_features = len(keep)
        else:
            m.out_channels = len(keep)
    for name in group.norms:
        m = modules[name]
        for t in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, t, None) is not None:
                _replace(m, t, getattr(m, t)[keep])
        m.num_features = len(keep)
    for name, per in group.consumers:
        m = modules[name]
        idx = (keep[:, None] * per + torch.arange(per)).flatten()
        mask = _bake(m)
        _replace(m, "weight", m.weight[:, idx])
        _remask(m, None if mask is None else mask[:, idx])
        if isinstance(m, nn.Linear):
            m.in_features = len(idx)
        else:
            m.in_channels = len(idx)


def channel_scores(model: nn.Module, group: Group, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per channel: the producers' output-row L2 norms (or given scores), each producer normalised to mean 1."""
    modules = dict(model.named_modules())
    total = None
    for name in group.producers:
        w = weights[name] if weights is not None else modules[name].weight.detach()
        s = w.flatten(1).norm(dim=1) if weights is None else w.flatten(1).sum(1)
        s = s / s.mean().clamp_min(1e-12)
        total = s if total is None else total + s
    return total


def width(model: nn.Module, group: Group) -> int:
    m = dict(model.named_modules())[group.producers[0]]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    targets: dict[str, float],
    original: dict[str, int],
    scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Remove channels so that each group keeps (1 - target) of its original width (at least 1 channel).

    targets: producer layer -> fraction of its original output channels to remove (a layer left out is
    not pruned, nor is any group it produces into); original: producer -> width before the first step.
    Returns producer -> width now."""
    out = {}
    for group in channel_groups(model, example):
        if any(p not in targets for p in group.producers):
            continue
        frac = min(targets[p] for p in group.producers)
        n, n0 = width(model, group), original.get(group.producers[0], width(model, group))
        keep_n = max(1, n0 - int(round(frac * n0)))
        if keep_n < n:
            s = channel_scores(model, group, None if scores is None else {p: scores[p] for p in group.producers})
            keep = torch.sort(torch.argsort(s, descending=True, stable=True)[:keep_n]).values
            shrink(model, group, keep.to(s.device))
        for p in group.producers:
            out[p] = keep_n if keep_n < n else n
    return out


# -- the prune stage's structured path ----------------------------------------------------------
def run(cfg, model: nn.Module, ctx, finals: dict[str, float]) -> nn.Module:
    """Prune.run for granularity=structured (`cfg`: the prune stage's config): gradual or one-shot to the
    final sparsity per layer in `finals`, fine-tuning after each step."""
    from lwpipe.constraints import compressible_layers
    from lwpipe.masks import cubic_schedule
    from lwpipe.scoring import taylor_scores
    from lwpipe.training import finetune

    example = ctx.test_loader()[0][0][:2].to(ctx.device)
    layers = dict(compressible_layers(model))
    original = {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels) for n, m in layers.items()}
    steps = cfg.steps if cfg.schedule == "gradual" else 1
    for t in range(1, steps + 1):
        targets = {n: cubic_schedule(0.0, finals[n], t, steps) for n in finals}
        scores = None
        if cfg.criterion == "taylor":
            mods = dict(compressible_layers(model))
            names = list(mods)
            with torch.enable_grad():
                raw = taylor_scores(
                    model, ctx.calibration_batches(cfg.calibration_batches), list(mods.values()), ctx.loss
                )
            scores = dict(zip(names, raw))
        elif cfg.criterion == "entropy":  # Luo & Wu 2017: the entropy of each channel's activations
            from lwpipe.calibration import task_forward
            from lwpipe.variational import channel_entropy

            scores = channel_entropy(
                model,
                dict(compressible_layers(model)),
                ctx.calibration_batches(cfg.calibration_batches),
                task_forward(ctx),
                cfg.bins,
            )
        widths = prune_channels(model, example, targets, original, scores)
        recalibrate_bn(model, ctx.calibration_batches(cfg.calibration_batches))
        log.info(
            "  structured prune step %d/%d: channels kept %s",
            t,
            steps,
            ", ".join(f"{n}={w}/{original[n]}" for n, w in widths.items()),
        )
        finetune(model, ctx, cfg.finetune)
    return model


def check(model: nn.Module, path: str, fallback: str) -> None:
    """Before any work: a model pruned structurally must trace (unless the recipe allows the mask fallback)."""
    try:
        trace(model)
    except Untraceable as e:
        if fallback != "mask":
            raise ConfigError(
                f"{path}.granularity",
                "structured",
                f"needs a model torch.fx can trace, and module {e.module} does not ({e.why}); "
                f"set {path}.untraceable=mask to mask whole rows instead of shrinking layers",
            ) from None
        log.warning("%s: module %s does not trace (%s): structured pruning masks rows instead", path, e.module, e.why)


# -- rebuilding smaller shapes -------------------------------------------------------------------
def layer_shapes(model: nn.Module) -> dict[str, tuple]:
    """Module name -> the shape structured pruning may shrink: a layer's weight, a norm's weight or statistics."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, LAYERS + NORMS):
            continue
        if parametrize.is_parametrized(m, "weight"):  # its shape, without computing the constrained weight
            out[name] = tuple(m.parametrizations.weight.original.shape)
        elif getattr(m, "weight", None) is not None:
            out[name] = tuple(m.weight.shape)
        elif getattr(m, "running_mean", None) is not None:
            out[name] = tuple(m.running_mean.shape)
    return out


def resized(model: nn.Module, built: dict[str, tuple]) -> bool:
    """Whether any layer of `model` is smaller than in `built` (layer_shapes of the model as its builder built
    it): model.lwp then says so ("resized"), and only such a file may shrink its model's layers when loaded."""
    now = layer_shapes(model)
    return any(n in now and len(now[n]) == len(s) and now[n] != tuple(s) for n, s in built.items())


@torch.no_grad()
def resize_to(model: nn.Module, shapes: dict[str, tuple]) -> None:
    """Give a freshly built model the (smaller) layer shapes a structurally pruned model had, so that its
    stored tensors load. `shapes`: plain tensor name -> shape. Layers whose shapes match, or that would
    have to grow, are left alone (loading then reports the mismatch)."""
    for name, m in model.named_modules():
        if not isinstance(m, LAYERS + NORMS):
            continue
        prefix = f"{name}." if name else ""
        want = shapes.get(prefix + "weight", shapes.get(prefix + "running_mean"))
        have = tuple(m.weight.shape) if getattr(m, "weight", None) is not None else tuple(m.running_mean.shape)
        if want is None or tuple(want) == have or len(want) != len(have) or any(a > b for a, b in zip(want, have)):
            continue
        for t in ("weight", "bias", "running_mean", "running_var"):
            if parametrize.is_parametrized(m, t):
                parametrize.remove_parametrizations(m, t, leave_parametrized=False)
            old = getattr(m, t, None)
            if old is not None:
                _replace(m, t, torch.zeros(tuple(want) if t == "weight" else (want[0],), dtype=old.dtype))
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = want
        elif isinstance(m, NORMS):
            m.num_features = want[0]
        else:
            m.out_channels, m.in_channels = want[0], want[1] * m.groups
