"""report.png / report.md come from the run's own files; lwpipe-report; pareto.png's labels."""

import json
import logging
import shutil

import pytest

from lwpipe import report
from lwpipe.artifact.decode import read, read_bytes
from lwpipe.sweep import point_labels
from tests.helpers import TINY, run_recipe

PNG = b"\x89PNG\r\n\x1a\n"
FAST = TINY + [
    "pipeline=[train,prune,share]",
    "stages.prune.sparsity=0.5",
    "stages.train.epochs=3",
    "stages.prune.finetune.epochs=2",
    "stages.share.finetune.epochs=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    run_recipe(FAST, d)
    return d


def records(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def test_every_run_writes_the_report_from_its_records(run_dir):
    assert (run_dir / "report.png").read_bytes()[:8] == PNG
    md = (run_dir / "report.md").read_text()
    assert "![report](report.png)" in md
    recs, final = records(run_dir), json.loads((run_dir / "summary.json").read_text())["final"]
    ends = [r for r in recs if r["event"] == "stage_end"]
    d = report.report_data(run_dir)
    assert d["sizes"] == [
        ("input (fp32)", recs[0]["dense_bytes"]),
        *[(r["stage"], r["compressed_bytes"]) for r in ends],
        ("model.lwp", final["compressed_bytes"]),
    ]
    assert [q for _, q, _ in d["quality"]] == [r["accuracy"] for r in recs]  # baseline, epochs, stage ends in order
    for r in ends:
        assert f"| {r['step']} | {r['stage']} | {100 * r['accuracy']:.2f}% |" in md
    # per layer: what model.lwp holds
    art = read(read_bytes(run_dir / "model.lwp"))
    assert [(x["layer"], x["weights"], x["kept"]) for x in d["layers"]] == [
        (l.name, l.cost["weights"], l.cost["nnz"])
        for l in art.layers  # noqa: E741
    ]
    assert all(1 <= x["distinct"] <= 32 for x in d["layers"])  # share's 5-bit codebook: at most 32 values


@pytest.mark.slow
def test_the_report_follows_the_records_not_the_model(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    recs = records(copy)
    recs[-1] = {**recs[-1], "accuracy": 0.1234, "latency_ms": 0.042, "macs": 1234}
    recs[0] = {**recs[0], "metric": "perplexity", "quality": 57.5}  # a task's headline metric wins over accuracy
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (copy / "report.png").unlink()
    assert report.main([str(copy)]) == 0
    md = (copy / "report.md").read_text()
    assert (copy / "report.png").read_bytes()[:8] == PNG and "wrote" in capsys.readouterr().out
    assert "| latency ms | MACs |" in md and "| 0.042 | 1,234 |" in md
    assert "| 0 | input | 57.50 |" in md and "perplexity" in md.splitlines()[0]


def test_no_records_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no records (metrics.jsonl missing or empty)" in err and str(tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # nothing written


def test_a_failing_report_warns_and_the_run_finishes(tmp_path, caplog, monkeypatch):
    def broken(d, path):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report, "draw", broken)
    caplog.set_level(logging.WARNING, "lwpipe")
    final, _ = run_recipe(TINY + ["pipeline=[train]", "stages.train.epochs=1"], tmp_path)
    assert any("logger.report failed" in r.getMessage() and "no fonts" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "summary.json").is_file() and not (tmp_path / "report.png").exists()


def test_pareto_labels_are_the_overrides_that_differ():
    rows = [
        {"job": "0", "overrides": "stages.prune.sparsity=0.8 stages.share.bits=4 seed=0"},
        {"job": "1", "overrides": "stages.prune.sparsity=0.9 stages.share.bits=4 seed=0"},
        {"job": "2", "overrides": "stages.prune.sparsity=0.9 stages.share.bits=5 seed=0"},
    ]
    assert point_labels(rows) == [
        "prune.sparsity=0.8 share.bits=4",
        "prune.sparsity=0.9 share.bits=4",
        "prune.sparsity=0.9 share.bits=5",
    ]
    assert point_labels(rows[:1]) == ["prune.sparsity=0.8 share.bits=4 seed=0"]


@pytest.mark.slow
def test_a_run_drawing_the_same_picture_copies_it_from_the_cache(tmp_path, monkeypatch):
    cache = [f"cache.dir={tmp_path / 'cache'}"]
    run_recipe(FAST + cache, tmp_path / "first")
    first = (tmp_path / "first" / "report.png").read_bytes()
    assert first[:8] == PNG and len(list((tmp_path / "cache").glob("*.png"))) == 1

    def no_drawing(d, path):
        raise AssertionError("drew a picture the cache holds")

    monkeypatch.setattr(report, "draw", no_drawing)
    run_recipe(FAST + cache, tmp_path / "again")  # an identical rerun: every stage and the picture cached
    assert (tmp_path / "again" / "report.png").read_bytes() == first
    md = (tmp_path / "again" / "report.md").read_text()
    assert md.splitlines()[0].startswith(f"# {tmp_path.name}/again: ") and "| 1 | train (cached) |" in md
    monkeypatch.undo()
    run_recipe(FAST + cache + ["stages.share.bits=3"], tmp_path / "other")  # another picture: drawn, stored
    assert (tmp_path / "other" / "report.png").read_bytes() not in (first, b"")
    assert len(list((tmp_path / "cache").glob("*.png"))) == 2


@pytest.mark.slow
def test_a_damaged_cached_picture_is_drawn_again(tmp_path):
    cache = [f"cache.dir={tmp_path / 'cache'}"]
    run_recipe(FAST + cache, tmp_path / "first")
    (stored,) = (tmp_path / "cache").glob("*.png")
    stored.write_bytes(stored.read_bytes()[:100])
    run_recipe(FAST + cache, tmp_path / "again")
    assert (tmp_path / "again" / "report.png").read_bytes() == (tmp_path / "first" / "report.png").read_bytes()


def test_the_report_uses_the_runs_cache_with_its_bound(tmp_path):
    from lwpipe.report import run_cache

    (tmp_path / "recipe.yaml").write_text(f"cache:\n  dir: {tmp_path / 'c'}\n  enabled: true\n  max_bytes: 1000\n")
    cache = run_cache(tmp_path)
    assert cache.dir == tmp_path / "c" and cache.max_bytes == 1000  # report.png entries obey cache.max_bytes
    (tmp_path / "recipe.yaml").write_text("cache:\n  enabled: false\n")
    assert run_cache(tmp_path) is None
