"""BatchNorm after pruning: re-estimate running statistics on training batches.

Pruning changes every activation a BatchNorm layer normalises, but its running
mean and variance still describe the unpruned network; in eval mode that
mis-normalises until enough fine-tuning steps have moved them (and not at all
with `finetune.epochs: 0`). `recalibrate_bn` resets them and recomputes exact
averages over a few batches (momentum=None: cumulative mean), weights untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, forward=None) -> bool:
    """Recompute every BatchNorm's running statistics on `batches` ((x, y) pairs); False if it has none."""
    bns = batchnorms(model)
    if not bns:
        return False
    device = next(model.parameters()).device
    was_training, momenta = model.training, [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x, *_ in batches:
            forward(model, x) if forward else model(x.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return True
