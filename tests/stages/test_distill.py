import copy

import pytest
import torch
from torch.nn import functional as F

from lwpipe import checkpoint
from lwpipe.config import validate
from lwpipe.constraints import constraint
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.models import TinyMLP
from lwpipe.stages.distill import Distill, DistillConfig, kd_loss
from lwpipe.stages.prune import Prune, PruneConfig
from lwpipe.stages.quantize import Quantize, QuantizeConfig
from lwpipe.stages.share import share_layer
from tests.helpers import TINY, compose_recipe


@pytest.fixture
def model(model, ctx):
    ctx.reference = copy.deepcopy(model).eval()
    return model


def test_kd_loss_matches_hinton_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    T, a = 3.0, 0.6
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = (1 - a) * F.cross_entropy(s, y) + a * T * T * kl
    assert torch.allclose(kd_loss(s, t, y, T, a), expected, atol=1e-6)
    assert torch.allclose(kd_loss(s, t, y, T, 0.0), F.cross_entropy(s, y))
    assert kd_loss(t, t, y, T, 1.0).abs() < 1e-6  # the student that equals its teacher pays nothing


def test_distill_trains_through_all_constraints_and_leaves_teacher(model, ctx):
    Prune(PruneConfig(sparsity=0.6)).run(model, ctx)
    share_layer(model[1], bits=2)
    Quantize(QuantizeConfig(bits=4, layers={"3": {"bits": 3}})).run(model, ctx)
    zeros = [m.weight.detach() == 0 for m in (model[1], model[3])]
    teacher_state = {k: v.clone() for k, v in ctx.reference.state_dict().items()}
    before = model[3].weight.detach().clone()
    Distill(DistillConfig(epochs=3, lr=1e-2)).run(model, ctx)
    assert not torch.equal(model[3].weight.detach(), before)  # it did train
    for m, z in zip((model[1], model[3]), zeros):
        w = m.weight.detach()
        assert (w[z] == 0).all()
        c = constraint(m)
        q = w / c.scale + c.zero_point
        assert (q - q.round()).abs().max() < 1e-4
    assert torch.unique(model[1].weight.detach()).numel() <= 4 + 1  # 4 centroids and the zeros
    assert all(torch.equal(v, ctx.reference.state_dict()[k]) for k, v in teacher_state.items())


def test_feature_distillation_pulls_activations_and_removes_hooks(model, ctx):
    torch.manual_seed(1)
    student = TinyMLP()  # a fresh student: far from the teacher's hidden layer
    x = ctx.data.train.tensors[0]
    gap = lambda: F.mse_loss(student[1](x), ctx.reference[1](x)).item()  # noqa: E731
    start = gap()
    Distill(DistillConfig(epochs=5, lr=1e-2, alpha=1.0, features=["1"], feature_weight=10.0)).run(student, ctx)
    assert gap() < start / 3
    assert not student[1]._forward_hooks and not ctx.reference[1]._forward_hooks


def test_teacher_from_checkpoint_file(model, ctx, tmp_path):
    other = TinyMLP()
    path = tmp_path / "teacher.safetensors"
    checkpoint.save_state(other, path)
    d = Distill(DistillConfig(teacher=str(path)))
    t = d.teacher(ctx, "stages.distill")
    assert torch.equal(t[1].weight, other[1].weight) and not t.training
    assert not any(p.requires_grad for p in t.parameters())


def test_missing_teacher_file_and_unknown_feature_are_refused(model):
    with pytest.raises(ConfigError, match="does not exist"):
        Distill.check_model(DistillConfig(teacher="nowhere/t.safetensors"), model, "stages.distill")
    with pytest.raises(ConfigError, match=r"stages\.distill\.features\[0\]='fc9'"):
        Distill.check_model(DistillConfig(features=["fc9"]), model, "stages.distill")


def test_teacher_must_be_an_earlier_stage():
    with pytest.raises(LwpipeError, match="is not an earlier stage"):
        validate(compose_recipe(TINY + ["pipeline=[train,distill,prune]", "+stages.distill.teacher=prune"]))
    recipe = validate(compose_recipe(TINY + ["pipeline=[train,prune,distill]", "+stages.distill.teacher=train"]))
    assert recipe.steps[-1].config.teacher == "train"


@pytest.mark.parametrize("key,value", [("temperature", 0), ("alpha", 1.5), ("feature_weight", -1)])
def test_bounds_name_the_path(key, value):
    with pytest.raises(LwpipeError, match=rf"stages\.distill\.{key}="):
        validate(compose_recipe(TINY + [f"++stages.distill.{key}={value}"]))


def test_teacher_named_stage_is_used_in_a_run(tmp_path):
    from tests.helpers import run_recipe

    final, records = run_recipe(
        TINY
        + [
            "cache=false",
            "artifact=false",
            "logger.console=null",
            "pipeline=[train,prune,distill]",
            "stages.train.epochs=3",
            "stages.prune.finetune.epochs=0",
            "stages.distill.epochs=2",
            "+stages.distill.teacher=prune",
        ],
        tmp_path,
    )
    assert [r["stage"] for r in records if r["event"] == "epoch" and r["stage"] == "distill"] == ["distill"] * 2
    from lwpipe.models import TinyMLP

    weights = sum(p.numel() for n, p in TinyMLP().named_parameters() if n.endswith("weight"))
    assert final["sparsity"] >= 0.5 * weights / final["params"] - 1e-6  # sparsity counts the biases too


def teacher_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "teacher" in r.getMessage() and r.levelname == "WARNING"]


@pytest.mark.slow
def test_an_untrained_default_teacher_is_warned_before_any_work(caplog):
    with caplog.at_level("WARNING", logger="lwpipe"):
        validate(compose_recipe(TINY + ["pipeline=[prune,train,distill]"]))
        assert (
            "is the model before prune, the first compression stage: the input model, untrained until train "
            "runs after prune" in teacher_warnings(caplog)[0]
        )
        caplog.clear()
        for fine in (
            "pipeline=[train,prune,distill]",
            "pipeline=[train,prune,train,distill]",
            "pipeline=[prune,distill]",
        ):  # a pretrained input needs no train stage
            validate(compose_recipe(TINY + [fine]))
    assert teacher_warnings(caplog) == []


def test_a_teacher_below_the_student_is_warned(model, ctx, caplog):
    torch.manual_seed(1)
    ctx.reference = TinyMLP().eval()  # untrained: chance accuracy against the trained student's
    with caplog.at_level("WARNING", logger="lwpipe"):
        Distill(DistillConfig(epochs=1)).run(model, ctx)
    (msg,) = teacher_warnings(caplog)
    assert msg.startswith("distill: the teacher scores accuracy ") and "below the student's" in msg


def test_a_teacher_that_is_the_student_is_warned(model, ctx, caplog):
    ctx.reference = copy.deepcopy(model).eval()  # distill first: the reference is the model itself
    with caplog.at_level("WARNING", logger="lwpipe"):
        Distill(DistillConfig(epochs=1)).run(model, ctx)
    assert teacher_warnings(caplog) == [
        "distill: the teacher is the model distill starts from (no stage changed "
        "it before distill), so it teaches nothing beyond the task loss; put "
        "distill after the compression stages"
    ]


def test_a_good_teacher_is_not_warned(model, ctx, caplog):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)  # the fixture's reference is the trained dense model
    with caplog.at_level("WARNING", logger="lwpipe"):
        Distill(DistillConfig(epochs=1)).run(model, ctx)
    assert teacher_warnings(caplog) == []
