"""prune.criterion=entropy: sparse variational dropout (unstructured) and activation entropy (structured)."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from lwpipe.constraints import constraint
from lwpipe.context import Context
from lwpipe.data import DataBundle
from lwpipe.errors import ConfigError
from lwpipe.stages.prune import Prune, PruneConfig

QUICK = {"criterion": "entropy", "variational": {"epochs": 3, "lr": 1e-2}, "sigma_lr": 0.1}


def kept(m: nn.Module) -> float:
    return int(torch.count_nonzero(m.weight)) / m.weight.numel()


def test_threshold_keeps_low_scores_and_leaves_a_plain_masked_model(model, ctx):
    names = set(dict(model.named_parameters()))
    Prune(PruneConfig(**QUICK, threshold=-2.0)).run(model, ctx)  # default log alpha; -2: a visible cut
    record = ctx.stage_record
    assert record["entropy_score"] == "log_alpha" and record["entropy_threshold"] == {"1": -2.0, "3": -2.0}
    for n in ("1", "3"):
        assert record["kept_fraction"][n] == pytest.approx(kept(model[int(n)]))
        assert 0 < record["kept_fraction"][n] < 1
        assert constraint(model[int(n)]).mask is not None
        assert not model[int(n)]._forward_hooks  # the posteriors are gone
    assert {n.replace("parametrizations.weight.original", "weight") for n, _ in model.named_parameters()} == names


def test_default_threshold_is_three(model, ctx):
    Prune(PruneConfig(**QUICK)).run(model, ctx)
    assert ctx.stage_record["entropy_threshold"] == {"1": 3.0, "3": 3.0}


def test_sparsity_removes_the_highest_scoring_fraction_and_layers_apply(model, ctx):
    cfg = PruneConfig(**QUICK, score="entropy", sparsity=0.75, layers={"3": {"sparsity": 0.5}}, dead_units=False)
    Prune(cfg).run(model, ctx)
    assert kept(model[1]) == pytest.approx(0.25) and kept(model[3]) == pytest.approx(0.5)


def test_gradual_reaches_the_target_and_masks_only_grow(model, ctx):
    Prune(PruneConfig(**QUICK, sparsity=0.8, schedule="gradual", steps=3, layers={"3": {"skip": True}})).run(model, ctx)
    assert kept(model[1]) == pytest.approx(0.2, abs=1 / 128)
    assert kept(model[3]) == 1.0 and constraint(model[3]) is None  # skipped: never parametrized


def test_threshold_that_empties_a_layer_names_it_and_its_score_range(model, ctx):
    with pytest.raises(
        ConfigError,
        match=r"stages.prune.threshold=-20.0: removes every weight of layer 1 .*"
        r"log_alpha scores range over \[-?[0-9.]+, -?[0-9.]+\]",
    ):
        Prune(PruneConfig(**QUICK, threshold=-20.0)).run(model, ctx)


def test_threshold_with_sparsity_is_refused():
    with pytest.raises(ValidationError, match=r"threshold=3.0 and sparsity=0.9 both say what goes; give one"):
        PruneConfig(criterion="entropy", threshold=3.0, sparsity=0.9)


def test_negative_kl_weight_is_refused():
    with pytest.raises(ValidationError, match=r"kl_weight"):
        PruneConfig(criterion="entropy", kl_weight=-0.1)


def test_negative_threshold_only_for_entropy():
    assert PruneConfig(criterion="entropy", score="entropy", threshold=-3.0).threshold == -3.0
    with pytest.raises(ValidationError, match=r"threshold=-3.0 prunes scores below it; it needs threshold >= 0"):
        PruneConfig(criterion="magnitude", threshold=-3.0)


def test_a_layer_it_cannot_parametrize_is_named_before_any_work():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(
        ConfigError,
        match=r"stages.prune.criterion='entropy': cannot parametrize layer 0: "
        r"Embedding .*layers=\{0: \{skip: true\}\}",
    ):
        Prune.check_model(PruneConfig(criterion="entropy"), model, "stages.prune")
    Prune.check_model(PruneConfig(criterion="entropy", layers={"0": {"skip": True}}), model, "stages.prune")


def test_structured_without_calibration_data_is_refused(tmp_path):
    empty = TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    ctx = Context(data=DataBundle(empty, empty, name="empty"), seed=0, run_dir=tmp_path)
    cfg = PruneConfig(criterion="entropy", granularity="structured", sparsity=0.5)
    with pytest.raises(ConfigError, match=r"stages.prune.criterion='entropy': needs calibration data"):
        Prune.check_context(cfg, ctx, "stages.prune")


def test_structured_removes_the_lowest_entropy_channels(model, ctx):
    with torch.no_grad():
        model[1].weight[:4] = 0  # hidden units 0-3 output their bias whatever the input: entropy 0
    survivors = model[1].weight[4:].detach().clone()
    Prune(PruneConfig(criterion="entropy", granularity="structured", sparsity=0.25, bins=16)).run(model, ctx)
    assert model[1].out_features == 12 and model[3].in_features == 12
    assert torch.equal(model[1].weight.detach(), survivors)


ENTROPY_BAD = {
    "kl_weight negative": (
        ["stages.prune.criterion=entropy", "+stages.prune.kl_weight=-1"],
        "stages.prune.kl_weight=-1",
    ),
    "threshold with sparsity": (
        ["stages.prune.criterion=entropy", "++stages.prune.threshold=3.0", "stages.prune.sparsity=0.9"],
        "both say what goes; give one of them",
    ),
    "structured threshold": (
        ["stages.prune.criterion=entropy", "+stages.prune.granularity=structured", "+stages.prune.threshold=3.0"],
        "threshold=3.0 prunes scores above it; it needs",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ENTROPY_BAD))
def test_bad_entropy_settings_fail_in_one_line_before_any_work(tmp_path, case):
    from tests.test_cli import lwpipe

    args, expected = ENTROPY_BAD[case]
    p = lwpipe(["model=tiny", "data=blobs", "pipeline=[train,prune]", *args], tmp_path)
    assert p.returncode == 2 and expected in p.stderr, p.stderr
    assert "Traceback" not in p.stderr + p.stdout and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_command_line_threshold_replaces_the_recipes_sparsity(tmp_path):
    """The documented command: the default recipe's sparsity gives way to the threshold typed."""
    import json

    from tests.test_cli import lwpipe

    p = lwpipe(
        [
            "model=tiny",
            "data=blobs",
            "pipeline=[train,prune]",
            "stages.train.epochs=2",
            "cache=false",
            "stages.prune.criterion=entropy",
            "++stages.prune.threshold=3.0",
            "measure.latency=false",
            "++stages.prune.variational.epochs=2",
            "stages.prune.finetune.epochs=1",
            "hydra.run.dir=run",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    prune = next(
        r for r in json.loads((tmp_path / "run" / "summary.json").read_text())["stages"] if r["stage"] == "prune"
    )
    assert prune["entropy_threshold"] == {"1": 3.0, "3": 3.0} and set(prune["kept_fraction"]) == {"1", "3"}


def test_units_nothing_reads_are_cleared_without_changing_outputs(model, ctx):
    from lwpipe.entropy_prune import clear_dead_units

    with torch.no_grad():
        model[3].weight[:, [2, 5]] = 0  # hidden units 2 and 5: no weight out
    x = ctx.test_loader()[0][0]
    before = model(x)
    assert clear_dead_units(model, x[:2]) == {"1": 2}
    assert torch.allclose(model(x), before)
    assert not model[1].weight[[2, 5]].any() and not model[1].bias[[2, 5]].any()
    assert bool(constraint(model[1]).mask[[0, 1, 3, 4]].all()) and not constraint(model[1]).mask[[2, 5]].any()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["entropy_lenet5", "entropy_lenet300"])
def test_entropy_recipes_run_and_leave_a_plain_model(name, tmp_path):
    import json

    import lwpipe
    from lwpipe.models import LeNet5, LeNet300
    from tests.test_cli import lwpipe as cli

    short = [
        "stages.train.epochs=2",
        "stages.prune.variational.epochs=2",
        "stages.prune.finetune.epochs=1",
        "stages.share.finetune.epochs=1",
        "stages.quantize.finetune.epochs=1",
        "stages.distill.epochs=1",
        "cache=false",
        "measure.latency=false",
        "hydra.run.dir=run",
    ]
    p = cli([f"recipe={name}", *short], tmp_path)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["train", "prune", "share", "quantize", "distill"]
    prune = summary["stages"][1]
    assert set(prune["entropy_threshold"].values()) == {3.0} and all(0 < v < 1 for v in prune["kept_fraction"].values())
    plain = (LeNet5(image_size=8) if name == "entropy_lenet5" else LeNet300(in_features=64)).state_dict()
    loaded = lwpipe.load(tmp_path / "run" / "model.lwp")
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in plain.items()}


@pytest.mark.parametrize(
    "extra", [{"granularity": "nm"}, {"granularity": "structured", "untraceable": "mask"}, {"scope": "global"}]
)
def test_entropy_with_a_grouping_it_cannot_score_is_refused(extra):
    with pytest.raises(ValidationError, match=r"criterion=entropy"):
        PruneConfig(criterion="entropy", **extra)
