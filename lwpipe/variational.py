"""Entropy pruning's math: sparse variational dropout and activation-histogram entropy.

Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017, "Variational Dropout Sparsifies Deep
Neural Networks"): each weight gets a Gaussian posterior N(theta, sigma^2); theta is the layer's own
(constrained) weight, log sigma^2 a learned tensor of the same shape. Training minimises the task loss
plus kl_weight x KL / N_train, the KL to the log-uniform prior approximated as in the paper:

    -KL(alpha) ~= k1 sigmoid(k2 + k3 log alpha) - 1/2 log(1 + 1/alpha) - k1,   log alpha = log sigma^2 - log theta^2

and the forward pass samples the pre-activations, not the weights (the local reparameterization trick):
    b ~ N(x W_theta + bias, x^2 W_sigma^2).
A weight whose posterior is wide next to its mean (log alpha large) carries noise, not signal: it goes.
`score: entropy` ranks by the posterior's differential entropy 1/2 log(2 pi e sigma^2) instead.

Structured (Luo & Wu 2017, "An Entropy-based Pruning Method for CNN Compression"): an output channel
whose activations over the calibration batches (spatially averaged) fall into few histogram bins
carries little information; `channel_entropy` scores it by that histogram's entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

K1, K2, K3 = 0.63576, 1.87320, 1.48695  # Molchanov et al. 2017, eq. 14
LOG_ALPHA_CLIP = 10.0  # |log alpha| beyond this changes neither the KL nor which weights go
INIT_LOG_SIGMA2 = -10.0  # posteriors start narrow: the trained model's function is kept at first
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def log_alpha(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """log alpha = log sigma^2 - log theta^2, clipped to [-10, 10] (a zero theta gives the clip)."""
    return (log_sigma2 - torch.log(theta * theta + 1e-8)).clamp(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)


class _KL(torch.autograd.Function):
    """kl_approx(log_alpha(theta, log_sigma2)) with its gradient written out: one autograd node instead of ~15
    (on small layers the per-op cost, not arithmetic, is what variational training pays for)."""

    @staticmethod
    def forward(ctx, theta, log_sigma2):
        t2 = theta * theta + 1e-8
        raw = log_sigma2 - torch.log(t2)
        la = raw.clamp(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)
        s = torch.sigmoid(K2 + K3 * la)
        ctx.save_for_backward(theta, t2, la, s, (raw > -LOG_ALPHA_CLIP) & (raw < LOG_ALPHA_CLIP))
        return -(K1 * s - 0.5 * F.softplus(-la) - K1).sum()

    @staticmethod
    def backward(ctx, grad):
        theta, t2, la, s, inside = ctx.saved_tensors
        # dKL/dla = -(k1 k3 s (1 - s) + 1/2 sigmoid(-la)), zero where clipped
        d = -(K1 * K3 * s * (1 - s) + 0.5 * torch.sigmoid(-la)) * inside * grad
        return d * (-2 * theta / t2), d


def kl_of(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """Summed kl_approx(log_alpha(theta, log_sigma2)), as one autograd node."""
    return _KL.apply(theta, log_sigma2)


def kl_approx(log_alpha_: torch.Tensor) -> torch.Tensor:
    """Summed KL(q || log-uniform prior), the paper's approximation (>= 0, -> 0 as alpha -> inf)."""
    neg = K1 * torch.sigmoid(K2 + K3 * log_alpha_) - 0.5 * F.softplus(-log_alpha_) - K1
    return -neg.sum()


def posterior_entropy(log_sigma2: torch.Tensor) -> torch.Tensor:
    """Differential entropy of N(theta, sigma^2): 1/2 log(2 pi e sigma^2), in nats."""
    return 0.5 * (math.log(2 * math.pi * math.e) + log_sigma2)


def weight_scores(theta: torch.Tensor, log_sigma2: torch.Tensor, score: str) -> torch.Tensor:
    """What `threshold` compares against: the higher, the sooner a weight goes."""
    return log_alpha(theta, log_sigma2) if score == "log_alpha" else posterior_entropy(log_sigma2)


def unsupported_layer(m: nn.Module) -> str | None:
    """Why a compressible layer cannot carry a variational posterior here, or None."""
    return None if isinstance(m, SUPPORTED) else f"{type(m).__name__} (entropy parametrizes Linear and Conv layers)"


class Posterior(nn.Module):
    """A layer's learned log sigma^2; its mean is the layer's own weight (through its constraints).

    `noise` is a forward hook: in training it adds the local reparameterization's sample
    sqrt(x^2 W_sigma^2) * eps to the layer's output (which is already the mean x W_theta + bias);
    in eval the layer computes with its mean weights. The model itself gains no module or parameter."""

    def __init__(self, layer: nn.Module, init_log_sigma2: float = INIT_LOG_SIGMA2):
        super().__init__()
        self.log_sigma2 = nn.Parameter(torch.full_like(layer.weight.detach(), init_log_sigma2))
        kept = layer.weight.detach() != 0  # masks do not change during variational training
        self.register_buffer("kept", None if bool(kept.all()) else kept.to(layer.weight.dtype))

    def noise(self, layer: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        if not layer.training:
            return out
        x = inputs[0]
        sigma2 = torch.exp(self.log_sigma2)
        if self.kept is not None:  # a pruned weight carries no noise either
            sigma2 = sigma2 * self.kept
        var = F.linear(x * x, sigma2) if isinstance(layer, nn.Linear) else layer._conv_forward(x * x, sigma2, None)
        return out + torch.sqrt(var + 1e-8) * torch.randn_like(out)

    def kl(self, layer: nn.Module) -> torch.Tensor:
        return kl_of(layer.weight, self.log_sigma2)

    @torch.no_grad()
    def scores(self, layer: nn.Module, score: str) -> torch.Tensor:
        return weight_scores(layer.weight, self.log_sigma2, score)


def kl_schedule(kl_weight: float, warmup_steps: int) -> Callable[[int], float]:
    """The KL term's weight at optimizer step t: linear from 0 to kl_weight over warmup_steps (as in the paper)."""
    return lambda t: kl_weight * (min(1.0, t / warmup_steps) if warmup_steps > 0 else 1.0)


def train_variational(
    model: nn.Module,
    layers: dict[str, nn.Module],
    train: Callable[[Callable, list], None],
    loss_fn: Callable,
    n_train: int,
    kl_at: Callable[[int], float],
    score: str,
    sigma_lr: float | None = None,
    step0: int = 0,
) -> tuple[dict[str, torch.Tensor], int]:
    """Give `layers` posteriors (forward hooks), run `train(loss, param_groups)`, take the hooks off.

    The loss is loss_fn(model, batch) + kl_at(step) * sum of KLs / n_train (the ELBO per example).
    Returns each layer's scores (`score`) and the step count reached; the posteriors die here."""
    posts = {n: Posterior(m).to(m.weight.device) for n, m in layers.items()}
    step = [step0]

    def loss(m: nn.Module, batch) -> torch.Tensor:
        step[0] += 1
        with parametrize.cached():  # each constrained weight computed once a step, not in forward, hook and KL
            kl = sum(p.kl(layers[n]) for n, p in posts.items())
            return loss_fn(m, batch) + kl_at(step[0]) * kl / n_train

    handles = [layers[n].register_forward_hook(p.noise) for n, p in posts.items()]
    try:
        rest = [p for p in model.parameters() if p.requires_grad]
        sigmas = [p.log_sigma2 for p in posts.values()]
        train(loss, [{"params": rest}, {"params": sigmas, **({"lr": sigma_lr} if sigma_lr else {})}])
        return {n: p.scores(layers[n], score) for n, p in posts.items()}, step[0]
    finally:
        for h in handles:
            h.remove()


# -- structured: Luo & Wu's activation entropy ----------------------------------------------------
def histogram_entropy(values: torch.Tensor, bins: int) -> torch.Tensor:
    """values: [N, C]. Per column, the entropy (nats) of a `bins`-bin histogram over its own range;
    a constant column has entropy 0."""
    lo, hi = values.min(0).values, values.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    idx = ((values - lo) / span * bins).long().clamp_(0, bins - 1)  # [N, C]
    counts = torch.zeros(bins, values.shape[1]).scatter_add_(0, idx, torch.ones_like(values))
    p = counts / values.shape[0]
    return -(p * torch.log(p.clamp_min(1e-30))).sum(0)


def pooled_outputs(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable, forward: Callable[[nn.Module, object], object]
) -> dict[str, torch.Tensor]:
    """Each layer's outputs over the batches, averaged over spatial positions: name -> [N, C_out]."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name: str):
        def record(_m, _inp, out):
            o = out.detach().float()
            seen[name].append(o.flatten(2).mean(2) if o.dim() > 2 else o.reshape(-1, o.shape[-1]))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v) for n, v in seen.items() if v}


def channel_entropy(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable, forward, bins: int
) -> dict[str, torch.Tensor]:
    """Per producer layer, each output channel's activation entropy as a [C, 1] score (higher: kept)."""
    pooled = pooled_outputs(model, layers, batches, forward)
    return {n: histogram_entropy(v, bins).unsqueeze(1) for n, v in pooled.items()}
