"""The one training loop: `train`, every stage's fine-tune and `distill` use it.

Training runs through whatever constraints the layers carry (see
constraints.py), so masks, codebooks and grids survive it by construction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lwpipe.constraints import trainable_parameters
from lwpipe.grid import pin_deferred
from lwpipe.settings import TrainSettings
from lwpipe.tasks import batch_len, model_device, to_device
from lwpipe.tasks.classification import Classification

log = logging.getLogger("lwpipe")

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, batch on the model's device) -> loss


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    """The classification task's loss on (x, y) batches: fit's default."""
    return Classification().loss(model, batch)


@dataclass(frozen=True)
class Hooks:
    """What fit calls while it trains: `on_epoch(epoch, mean_train_loss)` after each epoch and
    `on_batch(epoch, epochs, batch, batches, loss)` after each batch (the progress bar); either may be None."""

    on_epoch: Callable[[int, float], None] | None = None
    on_batch: Callable[[int, int, int, int, float], None] | None = None


def finetune(model: nn.Module, ctx, s: TrainSettings, loss_fn: LossFn | None = None, hooks: Hooks | None = None):
    """Fine-tune `model` under the constraints its layers carry: `s.epochs` of the task's loss (or `loss_fn`)
    on ctx's seeded training batches, each epoch reported to the runner (ctx.hooks). Every stage trains so."""
    if s.epochs == 0:  # one-shot: no loader, no hooks
        return model
    loader = ctx.train_loader(s.batch_size)
    return fit(model, loader, s, loss_fn=loss_fn or ctx.loss, hooks=hooks if hooks is not None else ctx.hooks(model))


def make_optimizer(params, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)


def fit(
    model: nn.Module,
    loader: Iterable,
    s: TrainSettings,
    loss_fn: LossFn = cross_entropy,
    hooks: Hooks | None = None,
    params: list[nn.Parameter] | None = None,
) -> nn.Module:
    """Train for `s.epochs`, calling `hooks` (see Hooks) after each batch and epoch.

    Stages pass `loss_fn=ctx.loss`, the task's loss, so the batch format is the task's business.
    """
    on_epoch, on_batch = (hooks.on_epoch, hooks.on_batch) if hooks is not None else (None, None)
    batches = len(loader) if hasattr(loader, "__len__") else 0
    params = params if params is not None else trainable_parameters(model)
    if s.epochs == 0 or not params:
        return model
    pin_deferred(model)  # a grid's zero levels join its mask before any weight moves (lwpipe.grid.pin_zeros)
    opt = make_optimizer(params, s)
    device = model_device(model)
    start = None  # the first batch's loss: what divergence is measured against
    for epoch in range(1, s.epochs + 1):
        model.train()
        total, n = 0.0, 0
        for i, batch in enumerate(loader, 1):
            batch = to_device(batch, device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            value = loss.item()
            total += value * batch_len(batch)
            start = value if start is None else start
            n += batch_len(batch)
            if on_batch:
                on_batch(epoch, s.epochs, i, batches, value)
        warn_if_diverging(epoch, total / max(n, 1), start)
        if on_epoch:
            on_epoch(epoch, total / max(n, 1))
    model.eval()
    return model


def warn_if_diverging(epoch: int, loss: float, first: float | None) -> None:
    """Warn when an epoch's mean training loss is not finite or 100 times the first batch's (lr too high?)."""
    if not math.isfinite(loss):
        log.warning("training loss is %s at epoch %d: training diverged (lower the learning rate)", loss, epoch)
    elif first is not None and first > 0 and loss > 100 * first:
        log.warning(
            "training loss grew from %.4g (first batch) to %.4g (epoch %d mean): training is diverging "
            "(lower the learning rate)",
            first,
            loss,
            epoch,
        )
