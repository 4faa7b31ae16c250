"""Low-rank factorization of Linear layers and 1x1 convolutions, W ~ U V, as two thinner layers.

A factorized layer `fc1` becomes `nn.Sequential(Linear(in, r, bias=False), Linear(r, out))`
(a 1x1 conv: two 1x1 convs, the first with its stride and padding),
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


def is_pointwise(m: nn.Module) -> bool:
    """A 1x1 convolution: a Linear over channels at every position, so it factorizes the same way."""
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d))
        and all(k == 1 for k in m.kernel_size)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def factorable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_pointwise(m)


def dims(m: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or a 1x1 convolution."""
    return (m.out_features, m.in_features) if isinstance(m, nn.Linear) else (m.out_channels, m.in_channels)


def factor_pair(m: nn.Module, r: int, bias: bool) -> nn.Sequential:
    """The empty pair replacing `m` at rank r: thin first (no bias), then the output layer. A 1x1 conv's
    first factor keeps its stride and padding (zero-padded positions give 0, then the bias, as before)."""
    (out_f, in_f), kw = dims(m), {"dtype": m.weight.dtype, "device": m.weight.device}
    if isinstance(m, nn.Linear):
        return nn.Sequential(nn.Linear(in_f, r, bias=False, **kw), nn.Linear(r, out_f, bias=bias, **kw))
    conv = type(m)
    return nn.Sequential(
        conv(in_f, r, 1, stride=m.stride, padding=m.padding, bias=False, **kw), conv(r, out_f, 1, bias=bias, **kw)
    )


@torch.no_grad()
def factorize_linear(m: nn.Module, r: int) -> nn.Sequential:
    """The rank-r truncated SVD W = U_r S_r V_r^T as a layer (in -> r, sqrt(S) V^T) then (r -> out, U sqrt(S)),
    for a Linear or a 1x1 convolution (its weight [out, in, 1, 1] read as [out, in])."""
    out_f, in_f = dims(m)
    w = m.weight.detach().double().reshape(out_f, in_f)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    pair = factor_pair(m, r, m.bias is not None)
    first, second = pair
    first.weight.copy_((root[:, None] * vh[:r]).to(m.weight.dtype).view_as(first.weight))
    second.weight.copy_((u[:, :r] * root[None, :]).to(m.weight.dtype).view_as(second.weight))
    if m.bias is not None:
        second.bias.copy_(m.bias.detach())
    return pair


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def restore_factorized(model: nn.Module, shapes: dict) -> None:
    """Where `shapes` (plain tensor name -> shape) has `X.0.weight` [r, in(, 1, 1)] and `X.1.weight`
    [out, r(, 1, 1)] for a Linear or 1x1 convolution X [out, in] of the model, replace X by the factorized
    pair, on X's device. Anything else is left alone (loading then reports the mismatch)."""
    for name, m in list(model.named_modules()):
        if not factorable(m) or not name:
            continue
        a, b = shapes.get(f"{name}.0.weight"), shapes.get(f"{name}.1.weight")
        if a is None or b is None or f"{name}.weight" in shapes or len(a) != m.weight.dim() or len(b) != len(a):
            continue
        if any(int(x) != 1 for x in (*a[2:], *b[2:])):
            continue
        (r, in_f), (out_f, r2) = (int(x) for x in a[:2]), (int(x) for x in b[:2])
        if (out_f, in_f) != dims(m) or r != r2 or not 1 <= r <= min(in_f, out_f):
            continue
        replace_module(model, name, factor_pair(m, r, f"{name}.1.bias" in shapes))
