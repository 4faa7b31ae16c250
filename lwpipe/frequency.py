"""A token-embedding table's grid step per row, by how often its token occurs in the calibration texts.

Each text reads only the rows of its own tokens, so a row's rounding error costs in proportion to how often
its token is read. Minimising that frequency-weighted squared error for a given number of bits (each row's
error ~ step_t^2, its bits ~ -log2 step_t a weight) gives step_t proportional to 1 / sqrt(f_t): frequent
tokens get a finer step, rare ones a coarser one, and tokens the calibration texts never use the coarsest.

With n_t the token's count in data.train (padding left out), N / V the mean count over the table's V rows
and `prior` a pseudo-count added to every token (so unseen tokens keep a finite step):

    step_t = step x sqrt((N / V + prior) / (n_t + prior))

which keeps the frequency-weighted mean of step_t^2 (weights n_t + prior) at step^2: on text like the
calibration texts a row read is as accurate, on average, as under the plain `step`, for fewer bits. Text
unlike them (other words) reads more coarse rows; a larger prior moves every row towards the plain step.
"""

from __future__ import annotations

import torch
from torch import nn

from lwpipe.errors import ConfigError
from lwpipe.grid import std_grid


def token_counts(dataset, rows: int, key: str) -> torch.Tensor:
    """How often each of `rows` token ids occurs in the dataset's input_ids (positions attention_mask marks
    as padding left out), as float32 [rows]. `key` names the setting in errors."""
    tensors = getattr(dataset, "tensors", None)
    if not isinstance(tensors, dict) or "input_ids" not in tensors:
        raise ConfigError(key, "set", "needs tokenized text in data.train (input_ids): use a text task's data")
    ids = tensors["input_ids"]
    mask = tensors.get("attention_mask")
    ids = ids[mask.bool()] if mask is not None else ids.reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise ConfigError(
            key,
            "set",
            f"data.train has token ids up to {int(ids.max())}, and the table has {rows} rows: "
            f"it is not the model's token-embedding table",
        )
    return torch.bincount(ids.reshape(-1).long(), minlength=rows).float()


def frequency_steps(counts: torch.Tensor, step: float, prior: float) -> torch.Tensor:
    """Each row's step, [rows, 1]: step x sqrt((mean count + prior) / (count + prior))."""
    return (step * ((counts.mean() + prior) / (counts + prior)).sqrt()).reshape(-1, 1)


def within_grid(steps: torch.Tensor, weight: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    """The steps, each raised where needed so that its row's largest weight stays inside the `bits` grid: a
    frequent token's fine step never clips its row (with bits 12 it never binds on a trained table)."""
    w = weight.detach().float()
    qmin, qmax, std, _ = std_grid(w, 1.0, bits, scheme, True, 0)  # step 1: the rows' std
    if scheme == "asymmetric":  # the zero point puts the row's lowest value (or 0) on qmin
        span, reach = w.amax(1, keepdim=True).clamp(min=0) - w.amin(1, keepdim=True).clamp(max=0), qmax - qmin
    else:
        span, reach = w.abs().amax(1, keepdim=True), min(-qmin, qmax)
    return torch.maximum(steps, span / (reach * std))


def check_table(name: str, module: nn.Module, key: str, step: float | None, per_channel: bool) -> None:
    """frequency_prior goes on a token-embedding table (nn.Embedding) with a step grid, one step per row."""
    if not isinstance(module, nn.Embedding):
        raise ConfigError(
            key, "set", f"layer {name} is a {type(module).__name__}; a step per token needs an Embedding table"
        )
    if step is None or not per_channel:
        raise ConfigError(
            key,
            "set",
            "scales the step grid of each token's row: it needs a step and granularity: per_channel "
            f"(here step={step}, granularity={'per_channel' if per_channel else 'per_tensor'})",
        )


def describe(counts: torch.Tensor, steps: torch.Tensor) -> dict:
    """The stage record's summary of one table's steps."""
    seen = counts > 0
    return {
        "rows_seen": int(seen.sum()),
        "rows": int(counts.numel()),
        "step_unseen": float(steps[~seen].max()) if bool((~seen).any()) else None,
        "step_min": float(steps.min()),
        "step_median_seen": float(steps[seen].median()) if bool(seen.any()) else None,
    }
