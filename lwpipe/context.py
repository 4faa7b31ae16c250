"""Runtime state a stage may use. Configs hold settings only; state lives here."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lwpipe.data import DataBundle
from lwpipe.tasks import Task
from lwpipe.tasks.classification import Classification
from lwpipe.training import Hooks


def stage_seed(seed: int, step: int, name: str) -> int:
    """Each stage gets its own seed, so its result does not depend on what ran before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{name}".encode()).digest()[:4], "little")


@dataclass
class Context:
    data: DataBundle
    seed: int
    run_dir: Path
    batch_size: int = 64
    eval_batch_size: int = 512
    device: torch.device = torch.device("cpu")
    task: Task = field(default_factory=Classification)  # batch format, loss, evaluation, what distill matches
    step: int = 0
    stage: str = ""
    # the model as it was before the first compression stage: distill's default teacher
    # and the reference for `teacher_agreement`
    reference: nn.Module | None = None
    # that uncompressed model's held-out outputs (predictions, embeddings): every figure that compares a
    # model with another (teacher_agreement, an embedding's cosine, export.json) compares with these
    reference_outputs: Any = None
    # models after named stages, kept only for the names a later stage asks for
    snapshots: dict[str, nn.Module] = field(default_factory=dict)
    # the runner's hooks (runner.Run): each epoch's record, and the progress bar
    on_epoch: Callable[..., None] | None = None  # (model, epoch, train_loss, **more fields)
    on_batch: Callable[..., None] | None = None  # (stage, epoch, epochs, batch, batches, loss)
    # fields the running stage adds to its stage_end record (quantize's bits: auto allotment); the runner empties it
    stage_record: dict = field(default_factory=dict)
    # the arithmetic of a bf16/fp16 model's heavy calls (lwpipe.compute; None: its own dtype), set by the runner:
    # an export traces the model as it is, and scores the model it was made from in this arithmetic
    compute: torch.dtype | None = None
    # the file an `export` stage wrote, loaded back (lwpipe.speed.Exported): its record times and scores it
    exported: Any = None
    # what model.lwp stores to rebuild the model (the builder's description, else the recipe's model section)
    model_config: dict | None = None
    _test_batches: list | None = field(default=None, repr=False)

    def train_loader(self, batch_size: int | None = None) -> DataLoader:
        g = torch.Generator().manual_seed(stage_seed(self.seed, self.step, self.stage))
        return DataLoader(self.data.train, batch_size=batch_size or self.batch_size, shuffle=True, generator=g)

    def test_loader(self) -> list:
        """The held-out batches, built once: the runner evaluates after every epoch."""
        if self._test_batches is None:
            ds, bs = self.data.test, self.eval_batch_size
            if isinstance(ds, TensorDataset):  # slicing beats collating item by item
                x, y = ds.tensors[:2]
                self._test_batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]
            elif hasattr(ds, "batches"):  # lwpipe.data.text.DictDataset: dict batches, sliced
                self._test_batches = ds.batches(bs)
            else:
                self._test_batches = list(DataLoader(ds, batch_size=bs))
        return self._test_batches

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The task's training loss (training.fit's loss_fn); the reference serves tasks without labels."""
        return self.task.loss(model, batch, self.reference)

    def calibration_batches(self, n: int, batch_size: int | None = None):
        """The first n batches of a seeded shuffle of the training set, in the task's batch format."""
        for i, batch in enumerate(self.train_loader(batch_size)):
            if i >= n:
                return
            yield batch

    def hooks(self, model: nn.Module, fields: Callable[[], dict] | None = None) -> Hooks:
        """For training.fit: reports each epoch to the runner (progress and metrics.jsonl) and each batch to
        the progress bar; `fields()`: more fields for the epoch's record (distill's alpha and temperature)."""
        on_epoch = None
        if self.on_epoch is not None:

            def on_epoch(epoch, loss):
                self.on_epoch(model, epoch, loss, **(fields() if fields else {}))

        on_batch = functools.partial(self.on_batch, self.stage) if self.on_batch is not None else None
        return Hooks(on_epoch, on_batch)
