"""Low-rank factorization of Linear layers, W ~ U V, as two thinner Linear layers.

A factorized layer `fc1` becomes `nn.Sequential(Linear(in, r, bias=False), Linear(r, out))`,
so its tensors are `fc1.0.weight` [r, in], `fc1.1.weight` [out, r] and `fc1.1.bias`; later
stages prune, share and quantize the factors like any layer. `restore_factorized` rebuilds
that structure in a freshly built model from the stored tensor names and shapes (lwpipe.load,
checkpoints, the stage cache).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def rank_for(s: torch.Tensor, rank: int | None, ratio: float | None, energy: float | None) -> int:
    """The rank kept: `rank` itself, `ratio` of the full rank (rounded up), or the fewest singular values whose
    squares hold `energy` of the sum of squares (the fraction of ||W||_F^2 kept)."""
    if rank is not None:
        return rank
    if ratio is not None:
        return max(1, math.ceil(ratio * s.numel()))
    share = (s.double() ** 2).cumsum(0) / (s.double() ** 2).sum().clamp(min=1e-300)
    return min(int(torch.count_nonzero(share < energy - 1e-12)) + 1, s.numel())


def saves(out_f: int, in_f: int, r: int) -> bool:
    return r * (in_f + out_f) < in_f * out_f


@torch.no_grad()
def factorize_linear(m: nn.Linear, r: int) -> nn.Sequential:
    """The rank-r truncated SVD W = U_r S_r V_r^T as Linear(in, r) (sqrt(S) V^T) then Linear(r, out) (U sqrt(S))."""
    w = m.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    first = nn.Linear(m.in_features, r, bias=False, dtype=m.weight.dtype, device=m.weight.device)
    second = nn.Linear(r, m.out_features, bias=m.bias is not None, dtype=m.weight.dtype, device=m.weight.device)
    first.weight.copy_((root[:, None] * vh[:r]).to(m.weight.dtype))
    second.weight.copy_((u[:, :r] * root[None, :]).to(m.weight.dtype))
    if m.bias is not None:
        second.bias.copy_(m.bias.detach())
    return nn.Sequential(first, second)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def restore_factorized(model: nn.Module, shapes: dict) -> None:
    """Where `shapes` (plain tensor name -> shape) has `X.0.weight` [r, in] and `X.1.weight` [out, r] for a
    Linear X [out, in] of the model, replace X by the factorized pair, on X's device. Anything else is left
    alone (loading then reports the mismatch)."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or not name:
            continue
        a, b = shapes.get(f"{name}.0.weight"), shapes.get(f"{name}.1.weight")
        if a is None or b is None or f"{name}.weight" in shapes or len(a) != 2 or len(b) != 2:
            continue
        (r, in_f), (out_f, r2) = (int(x) for x in a), (int(x) for x in b)
        if (in_f, out_f) != (m.in_features, m.out_features) or r != r2 or not 1 <= r <= min(in_f, out_f):
            continue
        kw = {"dtype": m.weight.dtype, "device": m.weight.device}
        replace_module(model, name, nn.Sequential(nn.Linear(in_f, r, bias=False, **kw),
                                                  nn.Linear(r, out_f, bias=f"{name}.1.bias" in shapes, **kw)))
