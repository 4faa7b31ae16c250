"""lwpipe/stages/order.py: every ordering rule comes from the stages' declarations, none from their names."""

import pytest
from pydantic import BaseModel

from lwpipe.config import Step, validate
from lwpipe.errors import ConfigError
from lwpipe.stages import order
from lwpipe.stages.base import Stage
from tests.helpers import TINY, compose_recipe


class Empty(BaseModel):
    pass


def stage(name: str, **declarations) -> Step:
    cls = type(name.title(), (Stage,), {"Config": Empty, **declarations})
    return Step(name, name, cls, Empty())


def test_a_refused_kind_refuses_whichever_stage_left_it_and_names_them_all():
    follower = stage("follower", refuses={"mask": "drops the mask {first} left; move it before {names}"})
    first, second = stage("a", leaves=("mask",)), stage("b", leaves=("mask", "grid"))
    with pytest.raises(ConfigError) as e:
        order.check([first, stage("c", leaves=("codebook",)), second, follower], ["a", "c", "b", "follower"])
    assert str(e.value) == (
        "pipeline[3]='follower': cannot follow ['a', 'c', 'b']: drops the mask a left; move it before a, b"
    )
    order.check([stage("c", leaves=("codebook",)), follower], ["c", "follower"])  # no mask before it: fine


def test_a_last_stage_anywhere_else_is_refused():
    with pytest.raises(ConfigError, match=r"pipeline\[0\]='end': must be the last stage; \['x'\] follow it"):
        order.check([stage("end", last=True), stage("x")], ["end", "x"])
    order.check([stage("x"), stage("end", last=True)], ["x", "end"])


def test_an_undeclared_stage_may_leave_anything_so_refusing_stages_may_not_follow_it():
    undeclared = stage("plugin")  # leaves None: Stage's default
    assert order.compresses(undeclared.cls)
    follower = stage("follower", refuses={"lowrank": "cannot follow factors {first} left"})
    with pytest.raises(ConfigError, match="cannot follow factors plugin left"):
        order.check([undeclared, follower], ["plugin", "follower"])


def test_needs_reference_follows_trains_gradients_and_reference_declarations():
    one_shot = stage("one", leaves=("grid",), trains=False, needs_reference=False)
    assert not order.needs_reference([one_shot, one_shot])
    assert order.needs_reference([one_shot, stage("t", trains=True, needs_reference=False)])
    assert order.needs_reference([stage("g", trains=False, needs_reference=False, needs_gradients=True)])
    assert order.needs_reference([stage("r", trains=False, needs_reference=True)])
    assert order.needs_reference([stage("undeclared")])  # conservative: trains, reads the reference


@pytest.mark.parametrize(
    "overrides, needed",
    [
        (["stages.prune.finetune.epochs=0", "stages.prune.criterion=magnitude"], False),
        (["stages.prune.finetune.epochs=1", "stages.prune.criterion=magnitude"], True),
        (["stages.prune.finetune.epochs=0", "stages.prune.criterion=taylor"], True),
    ],
)
def test_builtin_prune_declares_when_it_is_one_shot(overrides, needed):
    recipe = validate(compose_recipe(TINY + ["pipeline=[prune]", *overrides]))
    assert order.needs_reference(recipe.steps) is needed


def test_builtin_declarations_give_the_documented_kinds():
    recipe = validate(compose_recipe(TINY + ["pipeline=[prune,share,quantize,export]"]))
    kinds = {s.name: order.leaves(s.cls) for s in recipe.steps}
    assert kinds == {"prune": ("mask", "resized"), "share": ("codebook",), "quantize": ("grid",), "export": ()}
    assert [s.name for s in order.leaving(recipe.steps, "codebook", "grid")] == ["share", "quantize"]


def test_a_stage_that_needs_calibration_data_is_refused_without_training_batches():
    class NoData:
        data = type("D", (), {"train": []})()

    hungry = stage("hungry", needs_calibration=True)
    with pytest.raises(ConfigError, match=r"pipeline\[0\]='hungry': needs calibration data"):
        order.check_before_work([hungry], None, NoData())
    order.check_before_work([stage("fed", needs_calibration=False)], None, NoData())
