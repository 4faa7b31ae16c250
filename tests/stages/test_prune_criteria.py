"""Gradient and saliency (Optimal Brain Damage) criteria, and pruning by a score threshold."""

import copy
import logging

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

import lwpipe
from lwpipe.artifact import encode_model
from lwpipe.constraints import constraint
from lwpipe.errors import ConfigError
from lwpipe.stages.prune import Prune, PruneConfig, gradient_scores

CONFIG = {"_target_": "lwpipe.models.TinyMLP", "checkpoint": None}


def layers(model):
    return [model[1], model[3]]


def batches(ctx, n=3):
    return list(ctx.calibration_batches(n))


def hand_gradients(model, batches):
    out = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        out.append([m.weight.grad.clone() for m in layers(model)])
    return out


def test_gradient_scores_sum_absolute_gradients(model, ctx):
    bs = batches(ctx)
    got = gradient_scores(model, bs, layers(model), ctx.loss, "gradient")
    grads = hand_gradients(copy.deepcopy(model), bs)
    for i, s in enumerate(got):
        assert torch.allclose(s, sum(g[i].abs() for g in grads), atol=1e-6)


def test_saliency_is_half_fisher_times_weight_squared(model, ctx):
    bs = batches(ctx)
    got = gradient_scores(model, bs, layers(model), ctx.loss, "saliency")
    grads = hand_gradients(copy.deepcopy(model), bs)
    for i, (s, m) in enumerate(zip(got, layers(model))):
        fisher = sum(g[i] ** 2 for g in grads) / len(grads)
        assert torch.allclose(s, 0.5 * fisher * m.weight.detach() ** 2, atol=1e-9)


@pytest.mark.parametrize("criterion", ["gradient", "saliency"])
def test_new_criteria_hit_targets_and_keep_the_highest_scores(model, ctx, criterion):
    scores = gradient_scores(model, batches(ctx, 8), layers(model), ctx.loss, criterion)
    Prune(PruneConfig(criterion=criterion, sparsity=0.6)).run(model, ctx)
    w = model[1].weight.detach()
    kept = w != 0
    assert (~kept).float().mean().item() == pytest.approx(0.6, abs=1 / w.numel())
    assert scores[0][kept].min() >= scores[0][~kept].max()


def test_criteria_choose_different_weights(model, ctx):
    masks = []
    for criterion in ("magnitude", "gradient", "saliency"):
        m = copy.deepcopy(model)
        Prune(PruneConfig(criterion=criterion, sparsity=0.5)).run(m, ctx)
        masks.append(m[1].weight.detach() != 0)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


@pytest.mark.parametrize("criterion", ["magnitude", "saliency"])
def test_threshold_prunes_exactly_the_scores_below_it(model, ctx, criterion, caplog):
    scores = (
        gradient_scores(model, batches(ctx, 8), layers(model), ctx.loss, criterion)
        if criterion != "magnitude"
        else [m.weight.detach().abs() for m in layers(model)]
    )
    eps = min(float(s.median()) for s in scores)  # about half of one layer, less of the other
    expected = [s >= eps for s in scores]
    with caplog.at_level(logging.INFO, logger="lwpipe"):
        Prune(PruneConfig(criterion=criterion, threshold=eps, sparsity=0.1)).run(model, ctx)  # threshold wins
    for m, e in zip(layers(model), expected):
        assert torch.equal(constraint(m).mask, e)
    reached = 1 - expected[0].float().mean().item()
    assert f"1={reached:.3f}" in caplog.text and "reached sparsity" in caplog.text


def test_threshold_leaves_layers_with_their_own_sparsity_alone(model, ctx):
    Prune(PruneConfig(threshold=1e-6, layers={"3": {"sparsity": 0.5}})).run(model, ctx)
    assert (model[3].weight == 0).float().mean().item() == pytest.approx(0.5, abs=1 / model[3].weight.numel())
    assert (model[1].weight == 0).float().mean().item() < 0.05


def test_threshold_that_empties_a_layer_is_refused_before_any_layer_changes(model, ctx):
    # empties only the layer with the smaller largest weight; the other one would be pruned, but is not
    eps = min(float(m.weight.detach().abs().max()) for m in layers(model)) * 1.001
    with pytest.raises(ConfigError, match=r"stages.prune.threshold=.*prunes every weight of layer"):
        Prune(PruneConfig(threshold=eps)).run(model, ctx)
    assert all(constraint(m) is None or constraint(m).mask is None for m in layers(model))


@pytest.mark.parametrize(
    "extra",
    [
        {"granularity": "nm"},
        {"granularity": "structured"},
        {"schedule": "gradual", "steps": 3},
        {"scope": "global"},
        {"quality": 1.0},
    ],
)
def test_threshold_with_a_setting_that_cannot_use_it_is_refused(extra):
    with pytest.raises(ValidationError, match=r"threshold=0.01 prunes scores below it; it needs"):
        PruneConfig(threshold=0.01, **extra)


def test_threshold_bounds():
    with pytest.raises(ValidationError, match="threshold"):
        PruneConfig(threshold=-1.0)
    with pytest.raises(ValidationError, match="criterion"):
        PruneConfig(criterion="hessian")


def test_threshold_pruned_model_round_trips(model, ctx, tmp_path):
    Prune(PruneConfig(criterion="saliency", threshold=1e-7)).run(model, ctx)
    path = tmp_path / "model.lwp"
    path.write_bytes(encode_model(model, {"_target_": "lwpipe.models.TinyMLP"}))
    loaded = lwpipe.load(path, constrained=True)
    x = torch.randn(16, 8)
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(constraint(loaded[1]).mask, constraint(model[1]).mask)
