"""A run directory says exactly what ran, and `lwpipe-rerun DIR` reproduces its numbers."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lwpipe.config import validate
from tests.helpers import TINY, compose_recipe, run_recipe

FAST = TINY + [
    "pipeline=[train,prune]",
    "stages.train.epochs=4",
    "stages.prune.finetune.epochs=1",
    "stages.prune.sparsity=0.6",
    "seed=3",
]
TIMING = {"seconds", "eval_seconds"}


@pytest.fixture(scope="module")
def past_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("past")
    _, records = run_recipe(FAST, run_dir)
    return run_dir, records


def test_run_info_names_seed_commit_and_versions(past_run):
    info = json.loads((past_run[0] / "run_info.json").read_text())
    assert info["seed"] == 3 and info["torch"] == torch.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["lwpipe"].startswith("0.") and "+" in info["lwpipe"]
    assert info["git"] is None or len(info["git"]["commit"]) == 40
    assert info["threads"] == torch.get_num_threads()


def test_saved_config_is_the_resolved_recipe_and_composes_again(past_run):
    run_dir, _ = past_run
    text = (run_dir / "recipe.yaml").read_text()
    assert "${" not in text and "sparsity: 0.6" in text  # interpolations and swept values materialised
    saved = OmegaConf.load(run_dir / "recipe.yaml")
    assert list(saved.pop("defaults")) == [{"hydra": "default"}, "_self_"]  # where runs go, as for any run
    again = validate(saved)
    assert again.raw == validate(compose_recipe(FAST + ["cache=false", "measure.latency=false"])).raw


@pytest.mark.slow
def test_rerun_command_reproduces_the_metrics(past_run, tmp_path):
    run_dir, records = past_run
    exe = shutil.which("lwpipe-rerun")
    cmd = [exe] if exe else [sys.executable, "-c", "from lwpipe.cli import rerun; rerun()"]
    p = subprocess.run(
        cmd + [str(run_dir), f"hydra.run.dir={tmp_path / 'again'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    again = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["cached"] for r in again)  # the past run had cache=false: this recomputed everything
    drop = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert drop(again) == drop(records)


def test_rerun_without_a_run_directory_is_a_usage_error(tmp_path):
    exe = shutil.which("lwpipe-rerun")
    cmd = [exe] if exe else [sys.executable, "-c", "from lwpipe.cli import rerun; rerun()"]
    p = subprocess.run(cmd + [str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "usage: lwpipe-rerun RUN_DIR" in p.stderr


@pytest.mark.slow
def test_rerun_quiet_true_reaches_the_saved_console_logger(past_run, tmp_path):
    """recipe.yaml holds logger.console.quiet resolved to false: quiet=true must still silence the table."""
    run_dir, _ = past_run
    assert OmegaConf.load(run_dir / "recipe.yaml").logger.console.quiet is False
    exe = shutil.which("lwpipe-rerun")
    cmd = [exe] if exe else [sys.executable, "-c", "from lwpipe.cli import rerun; rerun()"]
    p = subprocess.run(
        cmd + [str(run_dir), "quiet=true", f"hydra.run.dir={tmp_path / 'q'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "accuracy" not in p.stdout + p.stderr and (tmp_path / "q" / "summary.json").exists()
