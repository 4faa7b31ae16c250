"""The metrics.jsonl / summary.json contract, on a tiny model."""

import json

import pytest

from lwpipe.models import TinyMLP
from tests.helpers import TINY, run_recipe

FIELDS = {
    "step",
    "stage",
    "event",
    "accuracy",
    "loss",
    "params",
    "nonzero_params",
    "sparsity",
    "max_unique_weights",
    "dense_bytes",
    "seconds",
    "teacher_agreement",
}
FAST = TINY + [
    "pipeline=[train,prune]",
    "stages.prune.sparsity=0.5",
    "stages.train.epochs=15",
    "stages.train.lr=0.01",
    "stages.prune.finetune.epochs=2",
]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    final, records = run_recipe(FAST, run_dir)
    return run_dir, final, records


def test_every_record_has_the_contract_fields(result):
    _, _, records = result
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)


def test_baseline_then_epochs_then_stage_end(result):
    _, _, records = result
    assert records[0]["event"] == "baseline" and records[0]["step"] == 0
    ends = [r for r in records if r["event"] == "stage_end"]
    assert [(r["step"], r["stage"]) for r in ends] == [(1, "train"), (2, "prune")]
    epochs = [r for r in records if r["event"] == "epoch" and r["stage"] == "train"]
    assert [r["epoch"] for r in epochs] == list(range(1, 16))


def test_training_learns_and_prune_is_measured(result):
    _, final, records = result
    base, trained = records[0], next(r for r in records if r["stage"] == "train" and r["event"] == "stage_end")
    assert trained["accuracy"] > base["accuracy"] + 0.3
    assert trained["teacher_agreement"] == 1.0  # train comes before any compression: it is the reference
    weights = sum(p.numel() for n, p in TinyMLP().named_parameters() if n.endswith("weight"))
    assert final["sparsity"] == pytest.approx(0.5 * weights / final["params"], abs=0.01)  # biases count too
    assert final["nonzero_params"] < trained["nonzero_params"]
    assert final["dense_bytes"] == 4 * final["params"]


def test_summary_holds_baseline_stages_final(result):
    run_dir, final, records = result
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["baseline"] == records[0]
    assert [s["stage"] for s in summary["stages"]] == ["train", "prune"]
    assert summary["final"]["accuracy"] == final["accuracy"] and summary["final"]["event"] == "final"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "01_train.safetensors",
        "02_prune.safetensors",
    ]


def test_same_seed_same_numbers(result, tmp_path):
    _, _, records = result
    _, again = run_recipe(FAST, tmp_path)
    drop = {"seconds", "eval_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == [
        {k: v for k, v in r.items() if k not in drop} for r in records
    ]


@pytest.mark.parametrize(
    "target, message",
    [
        ("qa_builders.nosuch", "module 'qa_builders' has no attribute 'nosuch'"),
        ("qa_no_such_module.build", "no module named 'qa_no_such_module'"),
        ("qa_broken.build", "no module named 'qa_missing_dependency'"),
        ("nodots", "expected a dotted path module.callable"),
    ],
)
def test_a_target_that_cannot_be_imported_is_one_line_naming_why(tmp_path, monkeypatch, target, message):
    from lwpipe.errors import ConfigError
    from lwpipe.runner import _instantiate

    (tmp_path / "qa_builders.py").write_text("def build():\n    return None\n")
    (tmp_path / "qa_broken.py").write_text("import qa_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        _instantiate({"_target_": target}, "model")
    assert message in str(e.value) and f"model._target_='{target}'" in str(e.value) and "\n" not in str(e.value)


QUICK = TINY + ["pipeline=[train,prune]", "stages.train.epochs=2", "stages.prune.finetune.epochs=0"]


def files_of(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_summary_json_is_written_after_every_other_file_of_the_run(tmp_path, monkeypatch):
    from lwpipe import checkpoint

    seen, real = {}, checkpoint.atomic_write

    def atomic_write(path, write):
        if path.name == "summary.json":
            seen.update(files_of(path.parent))  # what the run directory holds the moment it "finishes"
        real(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    run_recipe(QUICK + ["logger=tensorboard"], tmp_path)
    after = files_of(tmp_path)
    assert {"report.png", "report.md", "model.lwp", "metrics.jsonl"} <= set(seen)
    assert any(name.startswith("tensorboard/") for name in seen)
    assert after.pop("summary.json") and after == seen  # nothing written, or changed, after it


def test_a_run_killed_while_drawing_its_report_has_no_summary_json(tmp_path, monkeypatch):
    from lwpipe import report

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "draw", killed)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(QUICK, tmp_path)
    assert (tmp_path / "model.lwp").is_file() and not (tmp_path / "summary.json").exists()
