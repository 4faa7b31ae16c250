"""The one training loop: `train`, every stage's fine-tune and `distill` use it.

Training runs through whatever constraints the layers carry (see
constraints.py), so masks, codebooks and grids survive it by construction.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lwpipe.config import TrainSettings
from lwpipe.constraints import trainable_parameters

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def make_optimizer(params, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)


def fit(
    model: nn.Module,
    loader: DataLoader,
    s: TrainSettings,
    loss_fn: LossFn = cross_entropy,
    on_epoch: Callable[[int, float], None] | None = None,
    params: list[nn.Parameter] | None = None,
) -> nn.Module:
    """Train for `s.epochs`; `on_epoch(epoch, mean_train_loss)` after each epoch.

    Progress hook: `on_epoch.on_batch(epoch, epochs, batch, batches, loss)`, when the callback has one,
    after every batch (lwpipe/progress.py draws the bar; nothing else depends on it).
    """
    on_batch = getattr(on_epoch, "on_batch", None)
    batches = len(loader) if hasattr(loader, "__len__") else 0
    params = params if params is not None else trainable_parameters(model)
    if s.epochs == 0 or not params:
        return model
    opt = make_optimizer(params, s)
    device = next(model.parameters()).device
    for epoch in range(1, s.epochs + 1):
        model.train()
        total, n = 0.0, 0
        for batch, (x, y) in enumerate(loader, 1):
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            value = loss.item()
            total += value * len(y)
            n += len(y)
            if on_batch:
                on_batch(epoch, s.epochs, batch, batches, value)
        if on_epoch:
            on_epoch(epoch, total / max(n, 1))
    model.eval()
    return model
