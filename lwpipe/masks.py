"""Pruning masks from scores, and the schedule of a gradual prune: pure functions on tensors.

`lowest_mask` keeps all but the lowest fraction of the scores, `row_lowest_mask` does so within each
output row (Wanda's comparison group), `row_mask` drops whole output rows / channels, `nm_mask` keeps
n of every m consecutive weights along the input dimension, `threshold_mask` keeps the scores at least
a bound; `cubic_schedule` is Zhu & Gupta's (2017) sparsity at step t of a gradual prune.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the weights whose score is at least `threshold` (score < threshold is pruned)."""
    return scores >= threshold


def lowest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the round(sparsity * n) lowest scores (ties broken by position, as a stable sort would).

    A k-th value and a comparison instead of a full sort: no index tensor 8x the layer's size."""
    flat = scores.reshape(-1)
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if flat.device.type == "cpu":  # a partition copies the scores once; kthvalue also keeps int64 indices
        threshold = torch.tensor(np.partition(flat.numpy(), k - 1)[k - 1])
    else:
        threshold = flat.kthvalue(k).values
    mask = flat > threshold
    at = (flat == threshold).nonzero().squeeze(1)
    # how many of the tied scores go (the first ones); a bool .sum() would make an int64 copy
    below = k - int(torch.count_nonzero(flat < threshold))
    mask[at[below:]] = True
    return mask.view_as(scores)


def row_lowest_mask(scores: torch.Tensor, sparsity: float, axis: int = 0) -> torch.Tensor:
    """Within each output row (the slice along `axis`), keep all but the round(sparsity * row size) lowest;
    Wanda's comparison group. Rows are sorted a block at a time to bound memory."""
    rows = scores.movedim(axis, 0)
    flat = rows.reshape(rows.shape[0], -1)
    k = int(round(sparsity * flat.shape[1]))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k:
        block = max(1, (1 << 22) // max(flat.shape[1], 1))
        for i in range(0, flat.shape[0], block):
            drop = torch.sort(flat[i : i + block], dim=1, stable=True).indices[:, :k]
            mask[i : i + block].scatter_(1, drop, False)
    return mask.view(rows.shape).movedim(0, axis).contiguous()


def row_mask(scores: torch.Tensor, sparsity: float, axis: int = 0) -> torch.Tensor:
    """Structured: drop whole output rows / channels (slices along `axis`) with the lowest summed score."""
    moved = scores.movedim(axis, 0)
    keep = lowest_mask(moved.reshape(moved.shape[0], -1).sum(1), sparsity)
    shape = [1] * scores.dim()
    shape[axis] = -1
    return keep.view(shape).expand_as(scores).clone()


def nm_mask(scores: torch.Tensor, n: int, m: int, axis: int = 1) -> torch.Tensor:
    """N:M: in each group of m consecutive weights along the input dim, keep the n largest.
    axis=0: the input dim comes first (transformers' Conv1D, [in, out])."""
    if axis == 0:
        return nm_mask(scores.transpose(0, 1), n, m).transpose(0, 1).contiguous()
    flat = scores.flatten(1)
    cols = flat.shape[1]
    pad = (-cols) % m
    groups = F.pad(flat, (0, pad), value=float("-inf")).view(flat.shape[0], -1, m)  # padding is never kept
    keep_idx = groups.topk(n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep_idx, True)
    return mask.view(flat.shape[0], -1)[:, :cols].reshape(scores.shape)


def cubic_schedule(initial: float, final: float, t: int, steps: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - t/steps)^3."""
    return final + (initial - final) * (1 - t / steps) ** 3
