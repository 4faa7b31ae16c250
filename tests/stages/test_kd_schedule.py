"""Dynamic KD weighting: alpha and temperature on a schedule over distill's epochs, logged per epoch."""

import copy
import math

import pytest

from lwpipe.config import validate
from lwpipe.errors import LwpipeError
from lwpipe.stages.distill import Distill, DistillConfig, Schedule, epoch_weights
from tests.helpers import TINY, compose_recipe, run_recipe


def test_schedules_start_and_end_where_asked():
    lin = Schedule(schedule="linear", start=0.9, end=0.3)
    cos = Schedule(schedule="cosine", start=0.9, end=0.3)
    assert [round(lin.at(e, 4), 6) for e in range(1, 5)] == [0.9, 0.7, 0.5, 0.3]
    assert cos.at(1, 5) == pytest.approx(0.9) and cos.at(5, 5) == pytest.approx(0.3)
    assert cos.at(3, 5) == pytest.approx(0.6)  # the midpoint
    assert cos.at(2, 5) == pytest.approx(0.3 + 0.6 * (1 + math.cos(math.pi / 4)) / 2)  # slow start
    assert Schedule(schedule="constant", start=0.5).at(3, 9) == 0.5 and lin.at(1, 1) == 0.9


def test_config_takes_numbers_or_schedules():
    cfg = DistillConfig(epochs=3, alpha={"schedule": "linear", "start": 0.9, "end": 0.3}, temperature=2.0)
    assert [epoch_weights(cfg, e)["alpha"] for e in (1, 2, 3)] == pytest.approx([0.9, 0.6, 0.3])
    assert epoch_weights(cfg, 2)["temperature"] == 2.0


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "++stages.distill.alpha={schedule:linear,start:0.9,end:1.5}",
            r"stages\.distill\.alpha: end=1\.5 must be within",
        ),
        ("++stages.distill.alpha={schedule:cosine,start:0.9}", r"stages\.distill\.alpha: schedule=cosine .* set end"),
        ("++stages.distill.alpha={schedule:steps,start:0.9,end:0.1}", r"stages\.distill\.alpha: schedule='steps'"),
        ("++stages.distill.temperature={schedule:linear,start:0,end:4}", r"temperature: start=0\.0 must be above 0"),
        ("++stages.distill.alpha={schedule:linear,strat:0.9,end:0.1}", r"stages\.distill\.alpha: .*strat"),
        ("++stages.distill.alpha={schedule:constant,start:0.9,end:0.1}", r"end=0\.1 would be ignored"),
        ("++stages.distill.alpha=1.5", r"stages\.distill\.alpha=1\.5: must be within \[0, 1\]"),
    ],
)
def test_bad_schedules_name_key_value_and_allowed(override, expected):
    with pytest.raises(LwpipeError, match=expected):
        validate(compose_recipe(TINY + ["pipeline=[train,distill]", override]))


def test_distill_trains_with_each_epochs_alpha(model, ctx):
    ctx.reference = copy.deepcopy(model).eval()
    seen, calls = [], []
    cfg = DistillConfig(epochs=3, lr=1e-3, alpha={"schedule": "linear", "start": 1.0, "end": 0.0})
    task = ctx.task
    original = task.distill_loss

    def spy(student, teacher, batch, temperature, alpha):
        calls.append(alpha)
        return original(student, teacher, batch, temperature, alpha)

    task.distill_loss = spy
    ctx.on_epoch = lambda m, epoch, loss, **f: seen.append((epoch, f))
    try:
        Distill(cfg).run(model, ctx)
    finally:
        del task.distill_loss
    per_epoch = len(calls) // 3
    assert sorted(set(calls)) == [0.0, 0.5, 1.0] and calls[:per_epoch] == [1.0] * per_epoch
    assert calls[-1] == 0.0
    assert [(e, f["alpha"]) for e, f in seen] == [(1, 1.0), (2, 0.5), (3, 0.0)]
    assert all(f["temperature"] == 4.0 for _, f in seen)


def test_alpha_lands_in_the_epoch_records(tmp_path):
    _, records = run_recipe(
        TINY
        + [
            "pipeline=[train,distill]",
            "artifact=false",
            "logger.console=null",
            "++stages.distill.epochs=3",
            "++stages.distill.alpha={schedule:cosine,start:0.8,end:0.2}",
        ],
        tmp_path,
    )
    epochs = [r for r in records if r["stage"] == "distill" and r["event"] == "epoch"]
    assert [round(r["alpha"], 6) for r in epochs] == [0.8, 0.5, 0.2]
    assert all(r["temperature"] == 4.0 for r in epochs)
    assert not any("alpha" in r for r in records if r["stage"] == "train")
