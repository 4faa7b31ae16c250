"""Each task's headline metric and which way it improves: the one table the tasks, the recipe checks and the
sweep summary read. Free of torch, so that config validation and `lwpipe-summary` do not import it."""

from __future__ import annotations

# each task's headline metric (records' `metric`), known before any model is built
TASK_METRICS = {
    "classification": "accuracy",
    "text_classification": "accuracy",
    "causal_lm": "perplexity",
    "embedding": "cosine",
}

LOWER_IS_BETTER = frozenset({"perplexity", "loss"})  # every other metric: higher is better


def is_higher_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER
