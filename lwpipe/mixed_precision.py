"""Mixed precision by sensitivity (`quantize.bits: auto`): bits per layer under a budget.

Sensitivity, as HAWQ does it (Dong et al. 2019, "HAWQ: Hessian AWare Quantization of Neural Networks
with Mixed-Precision"; HAWQ-V2, Dong et al. 2020, sums the Hessian-weighted perturbation over a layer),
with the diagonal empirical Fisher F standing in for the Hessian:

    Omega(l, b) = sum_i F_ii * (w_i - Q_b(w_i))^2        over the layer's kept weights

Q_b is exactly what the quantize stage would apply at b bits (its scheme, granularity, step: the layer
is quantized on a copy), so the prediction matches what is applied. 1/2 sum_l Omega(l, b_l) is the
second-order estimate of the loss increase (the gradient term vanishes at a trained minimum).

Allotment: minimise sum_l Omega(l, b_l) subject to sum_l b_l * kept_l <= budget, a multiple-choice
knapsack solved exactly by dynamic programming over the budget (`allot`).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from lwpipe.constraints import clone

DEFAULT_CANDIDATES = (1, 2, 3, 4, 5, 6, 8)
MAX_STATES = 1 << 18  # DP table width: budgets above this many bits are counted in coarser units


@torch.no_grad()
def sensitivity(module: nn.Module, fisher: torch.Tensor, candidates, quantize: Callable[[nn.Module, int], None]
                ) -> dict[int, float]:
    """bits -> Omega(l, bits) for one layer; `quantize(layer, bits)` puts a layer on the stage's grid (here a copy
    of this one). Pruned weights are zero before and after, so the sum over all weights is the sum over kept."""
    w = module.weight.detach().double()
    f = fisher.double()
    out = {}
    for b in candidates:
        trial = clone(module)
        quantize(trial, b)
        out[b] = float((f * (w - trial.weight.detach().double()).pow(2)).sum())
        del trial
    return out


def allot(omega: list[dict[int, float]], kept: list[int], budget_bits: float) -> list[int] | None:
    """Bits per layer minimising sum Omega(l, b_l) with sum b_l * kept_l <= budget_bits; None when even the fewest
    bits exceed it. Exact dynamic programming over the budget in whole bits; above MAX_STATES bits, in units of
    u bits with each layer's cost rounded up to whole units (so the budget still holds, at most one unit a layer
    is left unspent). Ties go to fewer bits, so the result is deterministic."""
    unit = max(1, math.ceil(budget_bits / MAX_STATES))
    cap = int(budget_bits // unit)
    best = np.zeros(cap + 1)  # best[c]: least sum of Omega of the layers so far at cost <= c units
    choices = []
    for table, n in zip(omega, kept):
        bits = sorted(table)
        costs = [math.ceil(b * n / unit) for b in bits]
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int8)
        for i, (c, b) in enumerate(zip(costs, bits)):
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[:cap + 1 - c] + table[b]
            better = cand < new  # strict: an equal Omega keeps the fewer bits found first
            new[better], pick[better] = cand[better], i
        best = new
        choices.append((bits, costs, pick))
    if not np.isfinite(best[cap]):
        return None
    out, c = [], cap
    for bits, costs, pick in reversed(choices):
        i = int(pick[c])
        out.append(bits[i])
        c -= costs[i]
    return out[::-1]
