import pytest
import torch
from torch import nn

from lwpipe.config import TrainSettings
from lwpipe.constraints import constraint
from lwpipe.context import Context
from lwpipe.data import load_blobs
from lwpipe.stages.prune import Prune, PruneConfig, cubic_schedule, lowest_mask, nm_mask, row_mask


def weights(model):
    return [model[1].weight.detach(), model[3].weight.detach()]


def test_lowest_mask_drops_exactly_the_smallest():
    s = torch.tensor([[0.5, 0.1, 0.9], [0.3, 0.2, 0.8]])
    assert lowest_mask(s, 0.5).tolist() == [[True, False, True], [False, False, True]]


def test_row_mask_drops_whole_rows():
    s = torch.tensor([[1.0, 1.0], [0.1, 0.1], [5.0, 0.0], [0.2, 0.3]])
    assert row_mask(s, 0.5).tolist() == [[True, True], [False, False], [True, True], [False, False]]


def test_nm_mask_keeps_n_of_every_m():
    s = torch.rand(6, 10)
    mask = nm_mask(s, 2, 4)
    groups = mask[:, :8].reshape(6, 2, 4).sum(-1)
    assert (groups == 2).all() and (mask[:, 8:].sum(1) == 2).all()  # tail group of 2 keeps both
    # the kept ones are the largest of their group
    g = s[:, :4]
    assert torch.equal(mask[:, :4], g >= g.topk(2, dim=1).values[:, 1:])


def test_cubic_schedule_ends_at_target_and_front_loads():
    steps = [cubic_schedule(0.0, 0.9, t, 4) for t in range(5)]
    assert steps[0] == 0.0 and steps[-1] == pytest.approx(0.9)
    assert steps[1] - steps[0] > steps[4] - steps[3]


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_unstructured_hits_per_layer_targets(model, ctx, criterion):
    cfg = PruneConfig(criterion=criterion, sparsity=0.75, layers={"3": {"sparsity": 0.5}})
    Prune(cfg).run(model, ctx)
    w1, w3 = weights(model)
    assert (w1 == 0).float().mean().item() == pytest.approx(0.75, abs=1 / w1.numel())
    assert (w3 == 0).float().mean().item() == pytest.approx(0.5, abs=1 / w3.numel())


def test_magnitude_keeps_the_largest(model, ctx):
    before = model[1].weight.detach().clone()
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)
    kept = model[1].weight.detach() != 0
    assert before.abs()[kept].min() >= before.abs()[~kept].max()


def test_taylor_differs_from_magnitude(model, ctx):
    import copy

    a, b = copy.deepcopy(model), copy.deepcopy(model)
    Prune(PruneConfig(sparsity=0.5)).run(a, ctx)
    Prune(PruneConfig(sparsity=0.5, criterion="taylor")).run(b, ctx)
    assert not torch.equal(a[1].weight != 0, b[1].weight != 0)


def test_quality_threshold_is_std_rule(model, ctx):
    w = model[1].weight.detach().clone()
    Prune(PruneConfig(quality=1.0)).run(model, ctx)
    expected = w.abs() >= w.std()
    assert torch.equal(model[1].weight.detach() != 0, expected)


def test_structured_removes_rows(model, ctx):  # shrinks the layer and its consumer (lwpipe/structured.py)
    Prune(PruneConfig(granularity="structured", sparsity=0.5)).run(model, ctx)
    assert model[1].weight.shape == (8, 8) and model[3].weight.shape == (4, 8)


def test_global_scope_spreads_unevenly_but_hits_total(model, ctx):
    Prune(PruneConfig(scope="global", sparsity=0.6)).run(model, ctx)
    w1, w3 = weights(model)
    total = ((w1 == 0).sum() + (w3 == 0).sum()).item() / (w1.numel() + w3.numel())
    assert total == pytest.approx(0.6, abs=0.01)
    assert (w1 == 0).float().mean() != (w3 == 0).float().mean()


def test_mask_survives_finetuning_and_only_shrinks(model, ctx):
    Prune(PruneConfig(sparsity=0.5, finetune=TrainSettings(epochs=3, lr=1e-2))).run(model, ctx)
    mask1 = constraint(model[1]).mask.clone()
    assert torch.equal(model[1].weight.detach() != 0, mask1) or ((model[1].weight != 0) <= mask1).all()
    Prune(PruneConfig(sparsity=0.3)).run(model, ctx)  # a lower target never regrows
    assert (constraint(model[1]).mask <= mask1).all()
    assert (model[1].weight == 0).float().mean() >= 0.5 - 1e-6


def test_gradual_reaches_target(model, ctx):
    Prune(PruneConfig(schedule="gradual", steps=3, sparsity=0.8, finetune=TrainSettings(epochs=1, lr=1e-2))).run(
        model, ctx
    )
    w1, _ = weights(model)
    assert (w1 == 0).float().mean().item() == pytest.approx(0.8, abs=1 / w1.numel())


def test_unknown_layer_pattern_is_refused(model):
    from lwpipe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stages.prune.layers='fc9'.*the layers are 1, 3"):
        Prune.check_model(PruneConfig(layers={"fc9": {"sparsity": 0.1}}), model, "stages.prune")


def test_conv_layers_prune():
    from lwpipe.models import LeNet5

    ctx = Context(data=load_blobs(n=64), seed=0, run_dir=".")
    m = LeNet5(image_size=8)
    Prune(PruneConfig(sparsity=0.5)).run(m, ctx)
    assert (m.conv1.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert isinstance(m.conv1, nn.Conv2d)


def test_global_scope_never_empties_a_layer(model, ctx, caplog):
    with torch.no_grad():
        model[3].weight.mul_(1e-4)  # far below every weight of the first layer: ranked globally, it loses all
    Prune(PruneConfig(scope="global", sparsity=0.6)).run(model, ctx)
    w1, w3 = weights(model)
    assert int((w3 != 0).sum()) == 1 and "is kept" in caplog.text
