"""`classification` (one tensor in, logits out, labels) and `text_classification` (dict batches)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from lwpipe.errors import ConfigError
from lwpipe.task_metrics import TASK_METRICS, is_higher_better
from lwpipe.tasks.base import evaluating, inputs, logits_of, model_device, to_device


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Hinton et al. (2015); T^2 keeps the soft gradients' scale independent of T."""
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * hard + alpha * temperature**2 * soft


class Classification:
    """Batches are (x, y): the model gets `model(x)` and returns logits (or an object with .logits)."""

    name = "classification"
    metric = TASK_METRICS[name]
    higher_is_better = is_higher_better(metric)

    def split(self, batch):
        return batch[0], batch[1]

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        return logits_of(model(batch[0]))

    def loss(self, model: nn.Module, batch, reference=None) -> torch.Tensor:
        return F.cross_entropy(self.forward(model, batch), self.split(batch)[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, reference: torch.Tensor | None = None):
        logits, labels = [], []
        with evaluating(model) as device:
            for batch in batches:
                batch = to_device(batch, device)
                logits.append(self.forward(model, batch).float().cpu())
                labels.append(self.split(batch)[1].cpu())
        logits, labels = torch.cat(logits), torch.cat(labels)
        pred = logits.argmax(1)
        acc = (pred == labels).float().mean().item()
        out = {
            "accuracy": acc,
            "loss": F.cross_entropy(logits, labels).item(),
            "teacher_agreement": (pred == reference).float().mean().item() if reference is not None else 1.0,
            "metric": "accuracy",
            "quality": acc,
        }
        return out, pred

    def distill_loss(self, student, teacher, batch, temperature: float, alpha: float) -> torch.Tensor:
        return kd_loss(student, teacher, self.split(batch)[1], temperature, alpha)

    def check(self, model: nn.Module, data) -> None:
        from lwpipe.data.checks import check_data  # empty splits, shapes across splits, label range

        check_data(data, model, model_device(model))


class TextClassification(Classification):
    """Batches are dicts (input_ids, attention_mask[, token_type_ids], labels): `model(**inputs).logits`."""

    name = "text_classification"

    def split(self, batch):
        return inputs(batch), batch["labels"]

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        return logits_of(model(**inputs(batch)))

    def check(self, model: nn.Module, data) -> None:
        labels = [ds.tensors["labels"] for ds in (data.train, data.test) if "labels" in getattr(ds, "tensors", {})]
        if not labels:
            raise ConfigError("task", self.name, "needs labelled text data (data.label_column)")
        classes = getattr(getattr(model, "config", None), "num_labels", None)
        top = int(max(t.max() for t in labels))
        if classes is not None and top >= classes:
            raise ConfigError(
                "data.label_column",
                top,
                f"label outside the model's {classes} classes "
                f"(0..{classes - 1}); give the model a head with more labels (num_labels)",
            )
