"""The `lwpipe` command as a user runs it: clean errors, complete run directories."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from lwpipe.models import LeNet300
from tests.helpers import TINY

pytestmark = pytest.mark.slow
QUICK = TINY + ["pipeline=[train,prune]", "stages.train.epochs=2", "stages.prune.finetune.epochs=1"]


def lwpipe(args, cwd):
    exe = shutil.which("lwpipe")
    cmd = [exe] if exe else [sys.executable, "-m", "lwpipe.cli"]
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_run_writes_a_complete_run_directory(tmp_path):
    p = lwpipe(QUICK, tmp_path)
    assert p.returncode == 0, p.stderr
    (run_dir,) = list((tmp_path / "outputs" / "runs" / "default").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "baseline" and records[-1]["stage"] == "prune"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["accuracy"] == records[-1]["accuracy"]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "accuracy" in p.stdout + p.stderr  # the console table


def checkpoint_for_784(tmp_path):
    path = tmp_path / "w784.pt"
    torch.save(LeNet300(in_features=784).state_dict(), path)
    return f"model.checkpoint={path}"


BAD = {
    "unknown stage": (["pipeline=[train,pruen]"], "did you mean 'prune'"),
    "unknown key": (["+stages.prune.sparsty=0.5"], "stages.prune.sparsty: unknown key"),
    "sparsity out of range": (["stages.prune.sparsity=1.0"], "stages.prune.sparsity=1.0: Input should be less than 1"),
    "no settings no plugin": (["pipeline=[train,prune_b]"], "pipeline[1]='prune_b': no settings under stages.prune_b"),
    "missing data dir": (
        ["data=mnist", "data.root=/no/such/mnist"],
        "data.root='/no/such/mnist': directory does not exist",
    ),
    "checkpoint mismatch": (None, "does not fit the model LeNet300"),
    "layer that does not exist": (
        ["+stages.prune.layers.fc9.sparsity=0.5"],
        "stages.prune.layers='fc9': matches no compressible layer",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_message(tmp_path, case):
    args, expected = BAD[case]
    if args is None:
        args = [checkpoint_for_784(tmp_path)]
    run_dir = tmp_path / "outputs" / "run"
    p = lwpipe(args + [f"hydra.run.dir={run_dir}"], tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert expected in p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not run_dir.exists()  # nothing that looks like a run is left behind


MORE_BAD = {
    "model does not fit data": (["recipe=deep_compression_lenet5", "data=blobs"], "does not accept the data 'blobs'"),
    "batch size": (["data.batch_size=0"], "data.batch_size=0: must be a whole number >= 1"),
    "nm check names keys": (
        ["+stages.prune.granularity=nm", "+stages.prune.n=4", "+stages.prune.m=4"],
        "stages.prune: n=4 must be smaller than m=4",
    ),
    "name escapes outputs": (["name=../../x"], "name='../../x'"),
    "teacher file checked first": (["+stages.distill.teacher=/no/such.pt"], "stages.distill.teacher='/no/such.pt'"),
}


@pytest.mark.parametrize("case", list(MORE_BAD))
def test_more_bad_input_is_refused_before_any_work(tmp_path, case):
    args, expected = MORE_BAD[case]
    p = lwpipe(args, tmp_path)
    assert p.returncode == 2 and expected in p.stderr, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").rglob("*.jsonl"))


def test_refused_run_leaves_an_existing_directory_alone(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    p = lwpipe(["stages.prune.sparsity=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert p.returncode == 2 and "already holds another run" in p.stderr, p.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # no .hydra/, no lwpipe.log, no FAILED
    assert (run_dir / "notes.txt").read_text() == "keep me"


def test_a_run_refused_by_a_running_run_touches_nothing_of_its_directory(tmp_path):
    run_dir = tmp_path / "shared"  # what a run started with seed 0 holds while it runs
    (run_dir / ".hydra").mkdir(parents=True)
    for name, text in {
        ".lwpipe-owner": "4242\n",
        ".hydra/overrides.yaml": "- seed=0\n",
        ".hydra/config.yaml": "seed: 0\n",
        ".hydra/hydra.yaml": "hydra: {}\n",
        "lwpipe.log": "[the winner's log]\n",
    }.items():
        (run_dir / name).write_text(text)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    p = lwpipe([*QUICK, "seed=7", f"hydra.run.dir={run_dir}"], tmp_path)
    assert p.returncode == 2 and "already holds another run" in p.stderr, p.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run_dir.rglob("*")) == sorted([p.name for p in before] + [".hydra"])


def test_name_outside_outputs_deletes_and_leaves_nothing(tmp_path):
    work = tmp_path / "a" / "b"
    (tmp_path / "X").mkdir()  # an empty folder of the user's, where ../../X would point
    work.mkdir(parents=True)
    p = lwpipe(["name=../../X"], work)
    assert p.returncode == 2 and "name='../../X'" in p.stderr
    assert (tmp_path / "X").is_dir()
    assert sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*")) == [
        "X",
        "a",
        "a/b",
        "a/b/outputs",
        "a/b/outputs/runs",
    ]


def runs_together(tmp_path, n: int) -> tuple[int, int]:  # benchmarks/bench_runs_together.py runs 2, 5, 20
    """n runs (and one refused run) started at once; (separate complete run directories, FAILED markers)."""
    exe = shutil.which("lwpipe")
    cmd = [exe] if exe else [sys.executable, "-m", "lwpipe.cli"]
    args = TINY + ["pipeline=[train]", "stages.train.epochs=1", "cache=false"]
    procs = [
        subprocess.Popen(
            cmd + args + [f"seed={i}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for i in range(n)
    ]
    refused = subprocess.Popen(
        cmd + args + ["stages.train.lr=-1"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    for p in procs:
        assert p.communicate(timeout=600)[1] is not None and p.returncode == 0
    refused.communicate(timeout=600)
    assert refused.returncode == 2
    seeds = set()
    for d in (tmp_path / "outputs" / "runs" / "default").iterdir():
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((d / "summary.json").read_text())
        seed = json.loads((d / "run_info.json").read_text())["seed"]
        if (
            len(records) == 3
            and summary["seed"] == seed
            and (d / "model.lwp").exists()
            and summary["final"]["accuracy"] == records[-1]["accuracy"]
        ):  # one run's records, whole
            seeds.add(seed)
    return len(seeds), len(list((tmp_path / "outputs").rglob("FAILED")))


def test_five_runs_started_together_get_five_directories(tmp_path):
    complete, failed = runs_together(tmp_path, 5)
    print(f"5 runs started together: {complete} separate complete run directories")
    assert (complete, failed) == (5, 0)
