"""Sparse variational dropout's math and the activation-histogram entropy (lwpipe/variational.py)."""

import math

import pytest
import torch
from torch import nn

from lwpipe.variational import (
    Posterior,
    histogram_entropy,
    kl_approx,
    kl_schedule,
    log_alpha,
    posterior_entropy,
    train_variational,
    weight_scores,
)


def test_kl_approximation_is_the_papers_and_vanishes_for_wide_posteriors():
    la = torch.tensor([-8.0, 0.0, 3.0, 8.0])
    per = [float(kl_approx(la[i : i + 1])) for i in range(4)]
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    expect = -(k1 / (1 + math.exp(-(k2 + k3 * 0.0))) - 0.5 * math.log1p(1.0) - k1)
    assert per[1] == pytest.approx(expect, rel=1e-5)
    assert per[0] > per[1] > per[2] > per[3] >= 0 and per[3] < 1e-3  # wider (higher alpha): cheaper


def test_log_alpha_and_entropy_scores():
    theta, ls2 = torch.tensor([0.5, 0.0]), torch.tensor([-4.0, -4.0])
    assert log_alpha(theta, ls2)[0].item() == pytest.approx(-4.0 - math.log(0.25), rel=1e-5)
    assert log_alpha(theta, ls2)[1].item() == 10.0  # a zero mean: clipped, the highest score
    h = torch.distributions.Normal(0.0, math.exp(-2.0)).entropy()
    assert posterior_entropy(ls2)[0].item() == pytest.approx(float(h), rel=1e-5)
    assert torch.equal(weight_scores(theta, ls2, "entropy"), posterior_entropy(ls2))


@pytest.mark.parametrize("layer", [nn.Linear(6, 3), nn.Conv2d(2, 3, 3, padding=1)])
def test_local_reparameterization_has_the_weight_noise_variance(layer):
    torch.manual_seed(0)
    post = Posterior(layer, init_log_sigma2=-2.0)
    x = torch.rand(1, 6) if isinstance(layer, nn.Linear) else torch.rand(1, 2, 4, 4)
    layer.train()
    with torch.no_grad():
        mean = layer(x)
        samples = torch.stack([post.noise(layer, (x,), mean) for _ in range(4000)])
        op = (
            (lambda v, w: nn.functional.linear(v, w))
            if isinstance(layer, nn.Linear)
            else (lambda v, w: layer._conv_forward(v, w, None))
        )
        var = op(x * x, torch.exp(post.log_sigma2))  # Var(sum_i x_i w_i) for independent w_i ~ N(theta_i, s_i^2)
    assert bool(((samples.mean(0) - mean).abs() <= 5 * (var / 4000).sqrt()).all())
    assert torch.allclose(samples.var(0), var, rtol=0.1)
    layer.eval()
    assert torch.equal(post.noise(layer, (x,), mean), mean)  # eval: the mean weights


def test_kl_weight_warms_up_linearly():
    at = kl_schedule(2.0, 10)
    assert (at(0), at(5), at(10), at(50)) == (0.0, 1.0, 2.0, 2.0)
    assert kl_schedule(2.0, 0)(1) == 2.0


def test_histogram_entropy():
    torch.manual_seed(0)
    v = torch.stack([torch.full((400,), 3.0), torch.arange(400.0), torch.randn(400)], 1)
    h = histogram_entropy(v, bins=8)
    assert h[0] == 0.0  # one value: no information
    assert h[1].item() == pytest.approx(math.log(8), rel=1e-6)  # evenly spread: the maximum
    assert 0 < h[2] < h[1]


def test_irrelevant_inputs_get_wide_posteriors_and_the_model_gains_nothing():
    """Inputs 4..7 are noise the label ignores: their weights' log alpha rises above the signal's."""
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, :4].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(8, 2))
    before = set(dict(model.named_parameters()))
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731

    def train(loss, groups):
        opt = torch.optim.Adam(groups, lr=0.02)
        for _ in range(60):
            for b in batches:
                opt.zero_grad()
                loss(model, b).backward()
                opt.step()

    scores, steps = train_variational(model, {"0": model[0]}, train, loss_fn, 512, kl_schedule(1.0, 0), "log_alpha")
    assert steps == 60 * len(batches)
    s = scores["0"]
    assert s.shape == model[0].weight.shape
    assert s[:, 4:].mean() > s[:, :4].mean() + 3
    assert set(dict(model.named_parameters())) == before and not model[0]._forward_hooks


def test_kl_gradient_written_out_matches_autograd():
    from lwpipe.variational import kl_of

    torch.manual_seed(0)
    theta = (torch.randn(50) * 0.3).requires_grad_()
    ls2 = (torch.randn(50) * 4 - 4).requires_grad_()
    ours = torch.autograd.grad(kl_of(theta, ls2), [theta, ls2])
    ref = torch.autograd.grad(kl_approx(log_alpha(theta, ls2)), [theta, ls2])
    with torch.no_grad():
        assert float(kl_of(theta, ls2)) == pytest.approx(float(kl_approx(log_alpha(theta, ls2))), rel=1e-5)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
