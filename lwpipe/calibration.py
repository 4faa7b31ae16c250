"""Activation statistics from calibration batches, gathered with forward hooks (one model copy, no retraining).

`input_channel_norms` gives, per layer, the L2 norm of each input channel over every
calibration token / position: ||X_j||_2 in Wanda (Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models"), whose score is |W_ij| * ||X_j||_2.
The forward callable says how a batch is fed to the model (a task's `forward`), so
this module knows nothing of tasks or batch formats. Wanda's score itself, and the loop over the
task loss's weight gradients, live with the other pruning scores in lwpipe/scoring.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.constraints import in_axis

Forward = Callable[[nn.Module, object], object]


def default_forward(model: nn.Module, batch) -> object:
    """A classifier's batch (x, y): the model sees x."""
    device = next(model.parameters()).device
    return model(batch[0].to(device))


def task_forward(ctx) -> Forward:
    """The task's forward when the context has a task (dict batches for text models), else model(x)."""
    task = getattr(ctx, "task", None)
    return task.forward if task is not None and hasattr(task, "forward") else default_forward


def channel_axis(module: nn.Module) -> int:
    """The axis of an input activation that holds the layer's input channels."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1
    return -1  # Linear and transformers' Conv1D: features last


@torch.no_grad()
def input_channel_norms(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable, forward: Forward = default_forward
) -> tuple[dict[str, torch.Tensor], int]:
    """(name -> L2 norm of each input channel over all batches, number of batches seen).

    Layers without an input activation (Embedding) are left out. Sums of squares are kept in
    float64 per layer (one vector of in_channels each), so memory stays near one model copy.
    """
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str, module: nn.Module):
        axis = channel_axis(module)

        def gather(_module, args, kwargs):
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            x = x.movedim(axis, -1).reshape(-1, x.shape[axis]).double()
            sq = x.pow(2).sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq

        return gather

    seen = gather_inputs(model, {n: m for n, m in layers.items() if in_axis(m) is not None}, hook, batches, forward)
    return {n: s.sqrt().float() for n, s in sums.items()}, seen


@torch.no_grad()
def gather_inputs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    make_hook,
    batches: Iterable,
    forward: Forward = default_forward,
    before_batch=None,
) -> int:
    """One eval pass over `batches` with a forward pre-hook `make_hook(name, module)(module, args, kwargs)` on
    each layer (hooks removed and the training mode restored afterwards, whatever happens); `before_batch(batch)`
    runs before each forward. Returns the number of batches seen."""
    hooks = [m.register_forward_pre_hook(make_hook(name, m), with_kwargs=True) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with parametrize.cached():
            for batch in batches:
                if before_batch is not None:
                    before_batch(batch)
                forward(model, batch)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen
