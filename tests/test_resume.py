"""A run killed with SIGKILL mid-pipeline, started again, continues after its last completed stage."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import TINY

pytestmark = pytest.mark.slow
ARGS = TINY + [
    "stages.train.epochs=3",
    "stages.prune.finetune.epochs=1",
    "stages.share.finetune.epochs=1",
    "stages.quantize.finetune.epochs=0",
    "stages.distill.epochs=10",
]


def command(run_dir):
    exe = shutil.which("lwpipe")
    return ([exe] if exe else [sys.executable, "-m", "lwpipe.cli"]) + ARGS + [f"hydra.run.dir={run_dir}"]


def stage_ends(run_dir):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["event"] == "stage_end"]


def test_resume_after_sigkill(tmp_path):
    first = tmp_path / "first"
    proc = subprocess.Popen(command(first), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(stage_ends(first)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(stage_ends(first))
    assert 2 <= done < 5 and not (first / "summary.json").exists()  # killed mid-pipeline

    second = tmp_path / "second"
    p = subprocess.run(command(second), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ends = stage_ends(second)
    assert [r["cached"] for r in ends] == [True] * done + [False] * (5 - done)
    assert ends[:done] == [{**r, "cached": True} for r in stage_ends(first)]
    assert (second / "summary.json").exists()
