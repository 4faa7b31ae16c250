"""Compute cost in records: macs per example, latency at batch 1 and measure.batch, speedup, bad input."""

import json

import pytest
import torch
from torch import nn

from lwpipe.config import MeasureSettings
from lwpipe.context import Context
from lwpipe.data import load_blobs
from lwpipe.errors import ConfigError
from lwpipe.loggers.console import format_speed
from lwpipe.models import LeNet300
from lwpipe.speed import count_macs, forward_fn, speed_record
from tests.helpers import TINY, run_recipe


def test_macs_count_linear_and_conv_per_example():
    run = lambda m, b: m(b)  # noqa: E731
    assert count_macs(LeNet300(16, 4), run, torch.randn(5, 16)) == 16 * 300 + 300 * 100 + 100 * 4
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1, stride=2))
    assert count_macs(conv, run, torch.randn(2, 3, 8, 8)) == 8 * 8 * 4 * 3 * 9 + 4 * 4 * 2 * 4


def test_speed_record_times_batch_1_and_the_recipe_batch(tmp_path):
    ctx = Context(data=load_blobs(n=256, num_features=16), seed=0, run_dir=tmp_path)
    model = LeNet300(16, 4)
    settings = MeasureSettings(batch=32, repeats=5, warmup=1)
    base = speed_record(model, ctx, settings, None)
    assert set(base["latency_ms"]) == {"1", "32"} and all(v > 0 for v in base["latency_ms"].values())
    assert base["speedup"] == {"1": 1.0, "32": 1.0}
    later = speed_record(model, ctx, settings, base)
    assert later["speedup"]["32"] == pytest.approx(base["latency_ms"]["32"] / later["latency_ms"]["32"])
    assert "latency_ms" not in speed_record(model, ctx, MeasureSettings(latency=False), base)


def test_forward_goes_through_the_task_when_the_context_has_one(tmp_path):
    ctx = Context(data=load_blobs(n=64), seed=0, run_dir=tmp_path)
    seen = []
    ctx.task = type("T", (), {"forward": staticmethod(lambda m, b: seen.append(b) or m(b[0]))})()
    forward_fn(ctx)(nn.Identity(), (torch.ones(2, 8), torch.zeros(2)))
    assert len(seen) == 1


def test_records_carry_macs_and_latency_and_console_shows_speedup(tmp_path):
    final, records = run_recipe(
        [*TINY, "pipeline=[train,prune]", "stages.train.epochs=1", "measure.batch=16", "measure.repeats=3"], tmp_path
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    for r in [summary["baseline"], *summary["stages"]]:
        assert r["macs"] == 8 * 16 + 16 * 4 and set(r["latency_ms"]) == {"1", "16"}
        assert set(r["speedup"]) == {"1", "16"}
    assert [r["latency_form"] for r in [summary["baseline"], *summary["stages"]]] == ["plain", "plain", "baked"]
    text = format_speed(final)  # the console's summary ends with it
    assert "batch 1 " in text and "batch 16 " in text and "(baked plain model)" in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_a_constrained_model_is_timed_as_a_baked_plain_copy(tmp_path, monkeypatch):
    """What is deployed has plain weights: the parametrized training form recomputes them on every call."""
    from torch.nn.utils import parametrize

    from lwpipe import speed
    from lwpipe.constraints import ensure_constraint

    ctx = Context(data=load_blobs(n=64, num_features=16), seed=0, run_dir=tmp_path)
    model = LeNet300(16, 4).eval()
    ensure_constraint(model.fc1).set_mask(model.fc1.weight.detach().abs() > 0.02)
    timed = []
    monkeypatch.setattr(speed, "median_ms", lambda form, run, batch, *a: timed.append((form, batch)) or 1.0)
    record = speed_record(model, ctx, MeasureSettings(batch=8), None)
    assert record["latency_form"] == "baked" and len(timed) == 2
    x = ctx.test_loader()[0][0]
    for form, _ in timed:
        assert form is not model and not any(parametrize.is_parametrized(m) for m in form.modules())
        with torch.no_grad():
            assert torch.equal(form(x), model(x))
    assert parametrize.is_parametrized(model.fc1)  # the model itself keeps its constraint


def test_latency_off_and_batch_larger_than_the_test_set(tmp_path):
    final, _ = run_recipe([*TINY, "pipeline=[train]", "stages.train.epochs=1"], tmp_path / "a")
    assert "latency_ms" not in final and final["macs"] > 0
    with pytest.raises(ConfigError, match="measure.batch=60000"):
        run_recipe([*TINY, "pipeline=[train]", "measure.batch=60000"], tmp_path / "b")
    assert not (tmp_path / "b" / "run_info.json").exists()
