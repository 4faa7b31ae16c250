"""Per-weight importance scores for pruning: magnitude, taylor, gradient, saliency and wanda.

    magnitude   |w|
    taylor      sum over calibration batches of |w * dL/dw|
    gradient    sum over calibration batches of |dL/dw|
    saliency    Optimal Brain Damage (LeCun et al. 1990): 1/2 F_ii w_i^2, the diagonal empirical Fisher
                F_ii = mean over batches of (dL/dw_i)^2 standing in for the Hessian
    wanda       |w| x the L2 norm of its input channel's activations (Sun et al. 2023; the norms come from
                lwpipe/calibration.py's input_channel_norms)

The gradients come from one loop, `weight_gradients`: the task loss's gradient with respect to each layer's
effective weight (mask, codebook and grid applied), batch by batch. quantize's bits: auto builds its
empirical Fisher from the same loop (lwpipe/mixed_precision.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.layout import is_hf_conv1d
from lwpipe.tasks import to_device

Gradients = list[torch.Tensor | None]


def weight_gradients(
    model: nn.Module, layers: list[nn.Module], batches: Iterable, loss_fn
) -> Iterator[tuple[list[torch.Tensor], Gradients]]:
    """Per batch, (each layer's effective weight, detached; the gradient of the task loss `loss_fn(model, batch)`
    (Context.loss) with respect to it, None for a layer that takes none). Eval mode, restored afterwards."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with torch.enable_grad(), parametrize.cached():
                ws = [m.weight for m in layers]
                live = [w for w in ws if w.requires_grad]
                loss = loss_fn(model, to_device(batch, device))
                grads = iter(torch.autograd.grad(loss, live, allow_unused=True) if live else [])
                grads = [next(grads) if w.requires_grad else None for w in ws]
            yield [w.detach() for w in ws], grads
    finally:
        model.train(was_training)


def magnitude_scores(module: nn.Module) -> torch.Tensor:
    """|w| of the layer's effective weight (a fresh tensor)."""
    return module.weight.detach().abs()


def taylor_scores(model: nn.Module, batches, layers: list[nn.Module], loss_fn) -> list[torch.Tensor]:
    """sum over batches of |w * dL/dw| for each layer's effective weight."""
    scores = [torch.zeros_like(m.weight) for m in layers]
    for ws, grads in weight_gradients(model, layers, batches, loss_fn):
        for s, w, g in zip(scores, ws, grads):
            if g is not None:
                s += (w * g).abs()
    return scores


def gradient_scores(model: nn.Module, batches, layers: list[nn.Module], loss_fn, criterion: str) -> list[torch.Tensor]:
    """Per layer, from the task loss's gradient g of each effective weight w over the calibration batches:
    `gradient`: sum over batches of |g|;  `saliency`: 1/2 * mean over batches of g^2 * w^2 (OBD's
    1/2 h_ii w^2 with the diagonal empirical Fisher, batch gradients squared, as the Hessian's diagonal)."""
    sums = [torch.zeros_like(m.weight, dtype=torch.float32) for m in layers]
    seen = 0
    for _, grads in weight_gradients(model, layers, batches, loss_fn):
        for s, g in zip(sums, grads):
            if g is not None:
                s += g.detach().abs() if criterion == "gradient" else g.detach().float().pow(2)
        seen += 1
    if criterion == "saliency":
        return [0.5 * s / max(seen, 1) * m.weight.detach().float().pow(2) for s, m in zip(sums, layers)]
    return sums


def wanda_scores(module: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """|W| x the norm of each weight's input channel, in the weight's own layout."""
    w = module.weight.detach().abs()
    if is_hf_conv1d(module):  # [in, out]
        return w * norms.to(w.device).view(-1, 1)
    shape = [1] * w.dim()
    shape[1] = -1  # Linear [out, in]; Conv [out, in/groups, k...]
    if w.shape[1] != norms.numel():  # grouped conv: each group's slice of input channels
        groups = norms.numel() // w.shape[1]
        per_out = norms.view(groups, -1).repeat_interleave(w.shape[0] // groups, 0)  # [out, in/groups]
        return w * per_out.to(w.device).view(w.shape[0], w.shape[1], *([1] * (w.dim() - 2)))
    return w * norms.to(w.device).view(shape)
