"""SmoothQuant (Xiao et al. 2023) for `format: onnx`'s int8 Linear layers (`smooth: alpha`).

ONNX Runtime's int8 kernel quantizes a layer's input per batch with one scale for the whole tensor, so a few
input channels with large values (transformers have them) coarsen every other channel. Smoothing divides each
input channel j by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (max|X_j| over calibration batches, max|W_j|
over the weight's column j) and multiplies the weight's column j by s_j: the product is unchanged, the
activation range is flatter and the weight takes some of it. In the file the division is a Mul node before
the layer's DynamicQuantizeLinear, and the smoothed weight is re-rounded on each output channel's own 8-bit
range: its levels are no longer the quantize stage's. The extra error is recorded per layer (export.json's
`smooth_error`: |Q(W diag(s)) diag(1/s) - W| / |W|, W the compressed model's weight), so what the file
gives up against the pipeline's weights is measured, not hidden.

Why at export and not before the quantize stage: in a post-LayerNorm encoder (BERT) the normalised output
also feeds the residual branch, so 1/s cannot be folded into the LayerNorm; the division needs a node of its
own, which model.lwp's layers do not have. The export is where that node exists.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def input_max(model: nn.Module, names: list[str], batches, forward) -> dict[str, torch.Tensor]:
    """name -> max |x_j| of each input channel of the named Linear layers over `batches` (forward(model, b))."""
    mods = dict(model.named_modules())
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:

        def hook(mod, args, n=n):
            x = args[0].detach().float()
            a = x.abs().reshape(-1, x.shape[-1]).amax(0).cpu()
            stats[n] = torch.maximum(stats[n], a) if n in stats else a

        hooks.append(mods[n].register_forward_pre_hook(hook))
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in hooks:
            h.remove()
    return stats


def factors(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)."""
    s = amax.double().clamp(min=1e-5) ** alpha / wmax.double().clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5)


def smooth_layer(w: np.ndarray, s: torch.Tensor):
    """(levels, per-output-channel scales, 1/s, extra error) of Linear weight `w` (out, in) with its input
    channels multiplied by `s`, re-rounded symmetrically on each output channel's 8-bit range."""
    wt = torch.from_numpy(w).double()
    ws = wt * s
    scale = (ws.abs().amax(1) / 127).clamp(min=1e-12)
    levels = torch.round(ws / scale[:, None]).clamp(-127, 127)
    back = levels * scale[:, None] / s
    error = float((back - wt).norm() / wt.norm().clamp(min=1e-12))
    return (
        levels.to(torch.int8).numpy(),
        scale.float().numpy(),
        (1 / s).float().numpy(),
        error,
    )


def smooth(model: nn.Module, levels: dict, alpha: float, batches, forward) -> dict[str, float]:
    """Smooth every int8 Linear in `levels` (layer_levels' dict, rewritten in place: each entry gains the 1/s
    its input is multiplied by); returns name -> the extra relative weight error."""
    names = [n for n, (kind, *_) in levels.items() if kind == "linear"]
    amax = input_max(model, names, batches, forward)
    errors = {}
    for group in shared_inputs([n for n in names if n in amax], amax):  # unreached layers (a pooler) stay
        wmax = torch.stack([torch.from_numpy(levels[n][1]).abs().amax(0) for n in group]).amax(0)
        s = factors(amax[group[0]], wmax, alpha)
        for n in group:
            kind, w, _, _, axis = levels[n][:5]
            q, scale, inv, errors[n] = smooth_layer(w, s)
            levels[n] = (kind, w, q, scale, axis, inv)
    return {k: round(v, 6) for k, v in errors.items()}


def shared_inputs(names: list[str], amax: dict) -> list[list[str]]:
    """Layers grouped by input (equal maxima: q, k and v read one tensor). A group gets one s, so that its
    layers' Mul and DynamicQuantizeLinear are one node each in ORT's optimised graph, as without smoothing."""
    groups: list[list[str]] = []
    for n in names:
        same = next((g for g in groups if torch.equal(amax[g[0]], amax[n])), None)
        if same is None:
            groups.append([n])
        else:
            same.append(n)
    return groups
