"""What every task shares: the `Task` protocol and the helpers for batches, devices and model outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize


class Task(Protocol):
    name: str
    metric: str  # the headline metric: accuracy, perplexity or cosine
    higher_is_better: bool

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        """Logits (classification, causal_lm) or embeddings, from a batch already on the model's device."""

    def loss(self, model: nn.Module, batch, reference: nn.Module | None) -> torch.Tensor:
        """The training loss; `reference` is the uncompressed model (used by tasks without labels)."""

    def evaluate(self, model: nn.Module, batches: Iterable, reference: Any = None) -> tuple[dict, Any]:
        """(metrics, outputs): the record's quality keys, and what a later model is compared against."""

    def distill_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, batch, temperature: float, alpha: float
    ) -> torch.Tensor:
        """What the student matches of the teacher's forward() outputs."""

    def check(self, model: nn.Module, data) -> None:
        """Before any work: the model and the data fit this task (ConfigError otherwise)."""


def to_device(batch, device):
    """A batch (tensor, tuple/list or dict of tensors) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_len(batch) -> int:
    """The number of examples in a batch."""
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return len(batch[0])
    return len(batch)


def head(batch, n: int):
    """The first n examples of a batch."""
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[:n] for v in batch)
    return batch[:n]


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode without gradients, constraints computed once per weight while they take at most CACHED_BYTES
    (a 1 B-parameter model's would be a second copy of it: its constraints are computed per batch instead,
    the same values); yields the model's device and restores the model's training mode afterwards. Every
    task's evaluate runs inside it."""
    was_training = model.training
    model.eval()
    try:
        cache = parametrize.cached() if constrained_bytes(model) <= CACHED_BYTES else contextlib.nullcontext()
        with torch.no_grad(), cache:
            yield model_device(model)
    finally:
        model.train(was_training)


CACHED_BYTES = 256 << 20


def constrained_bytes(model: nn.Module) -> int:
    """Bytes of the weights constraints compute (what parametrize.cached holds)."""
    return sum(
        p.original.numel() * p.original.element_size()
        for m in model.modules()
        if parametrize.is_parametrized(m)
        for p in m.parametrizations.values()
    )


def inputs(batch: dict) -> dict:
    """The keyword inputs of a dict batch (labels are the task's, not the model's)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def model_inputs(batch):
    """What the model itself is called with: a dict batch's keyword inputs, a tuple batch's first item."""
    if isinstance(batch, dict):
        return inputs(batch)
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def logits_of(out) -> torch.Tensor:
    """A model's output object, tuple or tensor -> its logits."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, dict) and "logits" in out:  # a traced (TorchScript) transformers model returns a dict
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"the model returned a {type(out).__name__}: expected a tensor of logits or an object with .logits")
