"""The prune stage's config checks: which settings go together (run by PruneConfig's validator, each raising a
ValueError naming the setting and what is allowed), and a sparsity that would empty a layer (before any work)."""

from __future__ import annotations

from torch import nn

from lwpipe.constraints import compressible_layers, layer_setting
from lwpipe.errors import ConfigError


def check_sparsegpt(cfg) -> None:
    """sparsegpt ranks and reconstructs one layer at a time, weight by weight: no global or structured ranking."""
    if cfg.criterion != "sparsegpt":
        extra = sorted({"damp", "block"} & cfg.model_fields_set)
        if extra:
            raise ValueError(
                f"{extra[0]} is set but criterion={cfg.criterion}: {extra[0]} is only used by "
                f"criterion: sparsegpt; set criterion: sparsegpt or drop {extra[0]}"
            )
        return
    if cfg.scope == "global":
        raise ValueError("criterion=sparsegpt chooses each layer's mask from its own input Hessian; use scope=layer")
    if cfg.granularity == "structured":
        raise ValueError("criterion=sparsegpt drops single weights; use granularity=unstructured or nm")
    if cfg.threshold is not None:
        raise ValueError(
            "criterion=sparsegpt chooses a fraction of each block, not a score bound; use sparsity instead of threshold"
        )


def check_threshold(cfg) -> None:
    """`threshold` compares single weights' scores once: say which other setting cannot go with it."""
    why = (
        "granularity=unstructured (N:M and structured pruning choose a count, not a score bound)"
        if cfg.granularity != "unstructured"
        else "schedule=oneshot (a gradual schedule moves a target sparsity)"
        if cfg.schedule != "oneshot" and cfg.criterion != "entropy"
        else "threshold >= 0 (scores are non-negative)"
        if cfg.threshold < 0 and cfg.criterion != "entropy"
        else "scope=layer (one threshold already applies to every layer alike)"
        if cfg.scope != "layer"
        else "no quality (quality is magnitude's own threshold, quality x std)"
        if cfg.quality is not None
        else None
    )
    if why:
        side = "above" if cfg.criterion == "entropy" else "below"
        raise ValueError(f"threshold={cfg.threshold!r} prunes scores {side} it; it needs {why}")


def check_not_emptied(cfg, model: nn.Module, path: str) -> None:
    """A sparsity that rounds to every weight (0.999999 of fc1's 235,200) is refused before any work."""
    if cfg.granularity == "nm":
        return
    for name, m in compressible_layers(model):
        lc = layer_setting(name, cfg.layers)  # a LayerPrune, or None: the stage's settings
        own, quality = (None, None) if lc is None else (lc.sparsity, lc.quality)
        if (lc is not None and lc.skip) or (own is None and (quality or cfg.quality or cfg.threshold) is not None):
            continue
        sparsity = own if own is not None else cfg.sparsity
        n = m.weight.shape[0] if cfg.granularity == "structured" else m.weight.numel()
        if round(sparsity * n) >= n:
            what = "output rows" if cfg.granularity == "structured" else "weights"
            raise ConfigError(
                f"{path}.sparsity" if own is None else f"{path}.layers",
                sparsity,
                f"rounds to pruning all {n:,} {what} of layer {name}; a layer may never be pruned to "
                f"nothing (here at most {(n - 1) / n:.6g})",
            )
