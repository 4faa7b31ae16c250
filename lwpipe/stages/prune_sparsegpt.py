"""The prune stage's criterion: sparsegpt (Frantar & Alistarh 2023), layer group by layer group.

Each layer's mask and its kept weights' new values come from its input Hessian (lwpipe/gptq.py). With
`calibration.sequential` (the default) the groups are the model's repeated blocks, in order, as GPTQ does
(lwpipe/blockwise.py): a block's Hessians are gathered on the outputs of the blocks before it *as pruned*,
so each layer makes up for what the layers before it lost, and only one block's Hessians and activations
are alive at a time. Without it (or on a model without blocks, for a config built in code) one pass of the
original model gathers every layer's Hessian at once. A layer with no Hessian (an Embedding, a layer no
forward reached) is ranked by magnitude.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lwpipe import gptq
from lwpipe.blockwise import Calibrator, calibration_batches
from lwpipe.calibration import task_forward
from lwpipe.constraints import ensure_constraint, original_weight
from lwpipe.context import Context
from lwpipe.settings import CalibrationSettings

log = logging.getLogger("lwpipe")


@torch.no_grad()
def prune(stage, model: nn.Module, ctx: Context, layers: dict[str, nn.Module], targets: dict[str, float]) -> None:
    """Prune the layers of `targets` (name -> sparsity) group by group; `stage`: the Prune stage (its config,
    its magnitude masks for layers without a Hessian, its ConfigError for no calibration data)."""
    cfg = stage.cfg
    calibrator = Calibrator(model, cfg.calibration or CalibrationSettings(), strict=cfg.calibration is not None)
    if cfg.calibration is not None and "calibration_batches" not in cfg.model_fields_set:
        # calibration.samples texts of calibration.seq_len tokens (the stage's calibration_batches wins)
        batches = calibration_batches(ctx, cfg.calibration, ctx.batch_size)
    else:

        def batches():
            return ctx.calibration_batches(cfg.calibration_batches)

    by_magnitude = []
    for group in calibrator.groups(list(targets)):
        mods = {n: layers[n] for n in group}
        hs, _ = calibrator.supported_hessians(mods, batches, task_forward(ctx), stage._no_data)
        for n in group:
            if n in hs:
                stage._apply(layers[n], prune_layer(cfg, n, layers[n], hs.pop(n), targets[n]))
            else:
                by_magnitude.append(n)
                stage._apply(layers[n], stage._mask(layers[n], stage._score(n, layers[n], None, None), targets[n]))
    if by_magnitude:  # Embedding (no input activation), grouped convs, layers no forward reached
        log.info("  sparsegpt: no input Hessian for %s; ranked by magnitude", ", ".join(by_magnitude))


def prune_layer(cfg, name: str, m: nn.Module, h: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The layer's new keep mask (in its weight's shape); its kept weights get their new values in place."""
    c = ensure_constraint(m)
    w = original_weight(m).detach().float()
    keep = gptq.as_rows(m, c.mask) if c.mask is not None else None
    nm = (cfg.n, cfg.m) if cfg.granularity == "nm" else None
    block = max(cfg.m, cfg.block // cfg.m * cfg.m) if nm else cfg.block
    values, keep = gptq.sparsegpt_weight(gptq.as_rows(m, w), h, sparsity, nm, keep, block, cfg.damp, name)
    original_weight(m).copy_(gptq.from_rows(m, values, w.shape).to(original_weight(m).dtype))
    return gptq.from_rows(m, keep, w.shape)
