"""Mixed precision by sensitivity (`quantize.bits: auto`): bits per layer under a budget.

Sensitivity, as HAWQ does it (Dong et al. 2019, "HAWQ: Hessian AWare Quantization of Neural Networks
with Mixed-Precision"; HAWQ-V2, Dong et al. 2020: the second-order loss increase of quantizing one
layer, dw^T H dw, layers taken one at a time), with the empirical Fisher F standing in for the Hessian.
For each layer l and candidate width b, with dw = Q_b(w) - w over the layer's kept weights:

    fisher (default):    Omega(l, b) = dw^T F_l dw = mean over samples n of (g_n . dw)^2
    fisher_diagonal:     Omega(l, b) = sum_i F_ii dw_i^2,    F_ii = mean over samples of g_n,i^2

g_n the gradient of sample n's loss with respect to the layer's effective weight. The first is the
layer's whole block of the Fisher, so quantization errors that add up coherently within a neuron
count as they do (on LeNet-300-100 the diagonal rates binary fc2 less harmful than binary fc1; the block, like
the measured accuracy, the other way round); it keeps each candidate's dw, |candidates| copies of the weights.
The diagonal keeps one copy. Q_b is exactly what the quantize stage applies at b bits (its scheme,
granularity, step: the layer is quantized on a copy). 1/2 sum_l Omega(l, b_l) is the second-order
estimate of the loss increase, which leaves out the first-order term (zero only at a minimum).

Allotment: minimise sum_l Omega(l, b_l) subject to sum_l b_l * kept_l <= budget, a multiple-choice
knapsack solved exactly by dynamic programming over the budget (`allot`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from lwpipe.constraints import clone
from lwpipe.scoring import weight_gradients

DEFAULT_CANDIDATES = (1, 2, 3, 4, 5, 6, 8)
MAX_STATES = 1 << 18  # DP table width: budgets above this many bits are counted in coarser units

Quantizer = Callable[[nn.Module, int], None]  # puts a layer (a copy) on the stage's b-bit grid


@torch.no_grad()
def quantization_error(module: nn.Module, bits: int, quantize: Quantizer) -> torch.Tensor:
    """Q_b(w) - w of the layer's effective weight, measured on a copy; zero where pruned (zero before and after)."""
    trial = clone(module)
    quantize(trial, bits)
    return (trial.weight.detach() - module.weight.detach()).float()


@torch.no_grad()
def sensitivities(
    model: nn.Module,
    layers: list[nn.Module],
    candidates: list[list[int]],
    quantizers: list[Quantizer],
    batches: Iterable,
    loss_fn,
    diagonal: bool = False,
) -> tuple[list[dict[int, float]], int]:
    """(per layer, bits -> Omega(l, bits); samples seen), from one pass of per-sample gradients over `batches`
    (batches of one sample: `Context.calibration_batches(n, batch_size=1)`)."""
    if diagonal:
        sums = [torch.zeros(m.weight.shape, dtype=torch.float64, device=m.weight.device) for m in layers]
    else:  # each candidate's error, flattened: one dot product per sample and candidate
        deltas = [
            torch.stack([quantization_error(m, b, q).flatten() for b in bits])  # float32: memory
            for m, bits, q in zip(layers, candidates, quantizers)
        ]
        sums = [
            torch.zeros(len(bits), dtype=torch.float64, device=m.weight.device) for m, bits in zip(layers, candidates)
        ]
    seen = 0
    for _, grads in weight_gradients(model, layers, batches, loss_fn):
        for i, g in enumerate(grads):
            if g is not None:
                sums[i] += g.double().pow(2) if diagonal else (deltas[i] @ g.float().flatten()).double().pow(2)
        seen += 1
    out = []
    for m, bits, q, s in zip(layers, candidates, quantizers, sums):
        s = s / max(seen, 1)
        if diagonal:
            out.append({b: float((s * quantization_error(m, b, q).double().pow(2)).sum()) for b in bits})
        else:
            out.append({b: float(v) for b, v in zip(bits, s)})
    return out, seen


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
            cand[c:] = best[: cap + 1 - c] + table[b]
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
