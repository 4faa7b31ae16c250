"""`embedding`: sentence embeddings, no labels. Batches are dicts (input_ids, attention_mask[, token_type_ids]).

The embedding is whatever the model returns: a tensor (lwpipe.models.sentence.SentenceEncoder applies the
model's own pooling and normalisation), a `sentence_embedding` entry, or else the attention-masked mean
of `last_hidden_state`. Quality is the mean cosine similarity to the uncompressed reference model's
embeddings of the same test texts; training and distillation minimise 1 - that cosine.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from lwpipe.task_metrics import TASK_METRICS, is_higher_better
from lwpipe.tasks.base import evaluating, inputs, to_device


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embedding_of(out, batch: dict) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "sentence_embedding" in out:
        return out["sentence_embedding"]
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, dict):  # a traced (TorchScript) transformers model returns a dict
        hidden = out.get("last_hidden_state")
    if hidden is None and isinstance(out, (tuple, list)):
        hidden = out[0]
    if hidden is None:
        raise TypeError(
            f"the model returned a {type(out).__name__}: expected an embedding tensor, "
            "a 'sentence_embedding' entry or .last_hidden_state"
        )
    return mean_pool(hidden, batch["attention_mask"])


class Embedding:
    name = "embedding"
    metric = TASK_METRICS[name]
    higher_is_better = is_higher_better(metric)

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        return embedding_of(model(**inputs(batch)), batch)

    def loss(self, model: nn.Module, batch, reference: nn.Module | None = None) -> torch.Tensor:
        if reference is None:
            raise ValueError("the embedding task trains towards a reference model; none was given")
        with torch.no_grad():
            target = self.forward(reference, batch)
        return self.distill_loss(self.forward(model, batch), target, batch, 1.0, 1.0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, reference: torch.Tensor | None = None):
        with evaluating(model) as device:
            emb = torch.cat([self.forward(model, to_device(b, device)).float().cpu() for b in batches])
        cos = F.cosine_similarity(emb, reference, dim=-1).mean().item() if reference is not None else 1.0
        out = {
            "accuracy": None,
            "loss": 1.0 - cos,
            "cosine": cos,
            "teacher_agreement": cos,
            "metric": "cosine",
            "quality": cos,
        }
        return out, emb

    def distill_loss(self, student, teacher, batch, temperature: float, alpha: float) -> torch.Tensor:
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()

    def check(self, model: nn.Module, data) -> None:
        pass
