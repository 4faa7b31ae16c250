"""`causal_lm`: next-token prediction. Batches are dicts (input_ids, attention_mask).

Quality is perplexity, exp(mean next-token negative log-likelihood) over the
non-padding tokens of the test texts (lower is better); `teacher_agreement` is
the fraction of those positions where the model's top-1 next token equals the
reference model's; `accuracy` is top-1 next-token accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from lwpipe.errors import ConfigError
from lwpipe.task_metrics import TASK_METRICS, is_higher_better
from lwpipe.tasks.base import evaluating, inputs, logits_of, to_device


def shifted(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of the real next tokens: position t predicts token t+1; padding is dropped."""
    keep = batch["attention_mask"][:, 1:].bool()
    return logits[:, :-1][keep], batch["input_ids"][:, 1:][keep]


class CausalLM:
    name = "causal_lm"
    metric = TASK_METRICS[name]
    higher_is_better = is_higher_better(metric)

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        return logits_of(model(**inputs(batch)))

    def loss(self, model: nn.Module, batch, reference=None) -> torch.Tensor:
        logits, targets = shifted(self.forward(model, batch), batch)
        return F.cross_entropy(logits.float(), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, reference: torch.Tensor | None = None):
        nll, hits, preds = 0.0, 0, []
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        with evaluating(model) as device:
            for batch in (part for b in batches for part in row_chunks(b, vocab)):
                batch = to_device(batch, device)
                logits, targets = shifted(self.forward(model, batch), batch)
                nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
                pred = logits.argmax(-1)
                hits += int((pred == targets).sum())
                preds.append(pred.cpu())
        pred = torch.cat(preds)
        n = max(len(pred), 1)
        loss = nll / n
        ppl = math.exp(min(loss, 700.0))  # a finite number even for a ruined model
        out = {
            "accuracy": hits / n,
            "loss": loss,
            "perplexity": ppl,
            "teacher_agreement": (pred == reference).float().mean().item() if reference is not None else 1.0,
            "metric": "perplexity",
            "quality": ppl,
        }
        return out, pred

    def distill_loss(self, student, teacher, batch, temperature: float, alpha: float) -> torch.Tensor:
        """Hinton's loss per real next-token position: the teacher's next-token distributions."""
        s, targets = shifted(student, batch)
        t, _ = shifted(teacher, batch)
        hard = F.cross_entropy(s.float(), targets)
        soft = F.kl_div(
            F.log_softmax(s.float() / temperature, -1),
            F.log_softmax(t.float() / temperature, -1),
            reduction="batchmean",
            log_target=True,
        )
        return (1 - alpha) * hard + alpha * temperature**2 * soft

    def check(self, model: nn.Module, data) -> None:
        config = getattr(model, "config", None)
        if config is not None and not is_causal_lm(config):
            raise ConfigError(
                "task",
                self.name,
                f"does not fit the model: {type(model).__name__} "
                f"({config.model_type}) is not a causal (decoder) language model; "
                "use task=text_classification or task=embedding, or a decoder model",
            )


LOGITS_ELEMENTS = 1 << 26  # evaluation's logits at most this many floats at a time (256 MB in float32)


def row_chunks(batch: dict, vocab: int | None) -> list[dict]:
    """The batch split by rows so that one chunk's logits (rows x tokens x vocabulary) stay under
    LOGITS_ELEMENTS: a large vocabulary never needs a logits tensor for a whole test batch."""
    rows, tokens = batch["input_ids"].shape[:2]
    per = max(1, LOGITS_ELEMENTS // max(1, tokens * (vocab or 1)))
    if per >= rows:
        return [batch]
    return [{k: v[i : i + per] for k, v in batch.items()} for i in range(0, rows, per)]


def is_causal_lm(config) -> bool:
    """A decoder: a causal-LM model type that is not an encoder (BERT has a causal head only with is_decoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))
