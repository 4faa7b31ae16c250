"""Tasks: what differs between a classifier, a text classifier, a language model and an embedding model.

A task owns how a batch is fed to the model, the training loss, the held-out
evaluation (the headline `metric`, its value as `quality`, and the metric under
its own name) and what distillation matches. The runner, the stages and
training.fit call the task through `ctx.task`; none of them branches on it.
"""

from __future__ import annotations

from lwpipe.errors import ConfigError
from lwpipe.task_metrics import LOWER_IS_BETTER, TASK_METRICS  # noqa: F401  (re-exported)
from lwpipe.tasks.base import (  # noqa: F401  (re-exported: `from lwpipe.tasks import to_device` keeps working)
    Task,
    batch_len,
    evaluating,
    head,
    inputs,
    logits_of,
    model_device,
    model_inputs,
    to_device,
)


def make_task(name: str) -> Task:
    from lwpipe.tasks.causal_lm import CausalLM
    from lwpipe.tasks.classification import Classification, TextClassification
    from lwpipe.tasks.embedding import Embedding

    tasks = {
        "classification": Classification,
        "text_classification": TextClassification,
        "causal_lm": CausalLM,
        "embedding": Embedding,
    }
    if name not in tasks:
        raise ConfigError("task.name", name, f"must be one of {', '.join(tasks)}")
    return tasks[name]()
