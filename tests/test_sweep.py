"""Multiruns through the `lwpipe` command: the sweep summary, failed jobs, and the presets."""

import csv
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lwpipe.cli import RECIPES
from lwpipe.config import validate
from lwpipe.models import TinyMLP
from lwpipe.sweep import pareto_front
from tests.helpers import TINY, compose_recipe
from tests.test_cli import lwpipe

QUICK = TINY + ["pipeline=[train,prune]", "stages.train.epochs=3", "stages.prune.finetune.epochs=1"]


def rows(sweep_dir):
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_multirun_summary_lists_every_job_and_a_failed_one_does_not_stop_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    p = lwpipe(["-m", *QUICK, "stages.prune.sparsity=0.5,1.5,0.8", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert p.returncode == 1, p.stderr  # the sweep finished, and says that a job failed
    assert "1 of 3 jobs failed (1)" in p.stderr
    table = rows(sweep)
    assert [(r["job"], r["status"]) for r in table] == [("0", "completed"), ("1", "failed"), ("2", "completed")]
    assert "stages.prune.sparsity=1.5" in table[1]["overrides"] and table[1]["accuracy"] == ""
    assert (sweep / "1" / "FAILED").read_text().startswith("stages.prune.sparsity=1.5")
    for r, sparsity in ((table[0], 0.5), (table[2], 0.8)):
        summary = json.loads((sweep / r["job"] / "summary.json").read_text())
        assert float(r["accuracy"]) == summary["final"]["accuracy"]
        weights = sum(p.numel() for n, p in TinyMLP().named_parameters() if n.endswith("weight"))
        share = weights / summary["final"]["params"]  # sparsity counts every parameter, biases too
        assert float(r["sparsity"]) == pytest.approx(sparsity * share, abs=0.02) and float(r["seconds"]) > 0
    # the third job reuses the first job's train stage from the shared cache
    assert [r["cached"] for r in records(sweep / "2") if r["event"] == "stage_end"] == [True, False]
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = (sweep / "summary.csv").read_text()
    (sweep / "summary.csv").unlink()
    (sweep / "pareto.png").unlink()
    p = _summary_cli(sweep, tmp_path)
    assert p.returncode == 0, p.stderr
    assert (sweep / "summary.csv").read_text() == before and (sweep / "pareto.png").exists()


def _summary_cli(sweep, cwd):
    import shutil
    import subprocess
    import sys

    exe = shutil.which("lwpipe-summary")
    cmd = [exe] if exe else [sys.executable, "-c", "from lwpipe.sweep import main; main()"]
    return subprocess.run(cmd + [str(sweep)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_summary_cli_refuses_what_is_not_a_sweep(tmp_path):
    p = _summary_cli(tmp_path, tmp_path)
    assert p.returncode == 2 and "is not a sweep directory" in p.stderr
    p = _summary_cli(tmp_path / "nope", tmp_path)
    assert p.returncode == 2 and "no such directory" in p.stderr
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    p = _summary_cli(tmp_path, tmp_path)
    assert p.returncode == 2 and "no Hydra job directories" in p.stderr
    assert not (tmp_path / "summary.csv").exists()


def test_pareto_front_keeps_the_undominated_points():
    points = [(2.0, 0.9), (4.0, 0.8), (3.0, 0.7), (4.0, 0.85), (1.0, 0.95), (1.0, 0.9)]
    assert pareto_front(points) == [0, 3, 4]


@pytest.mark.slow
def test_optuna_preset_optimises_two_objectives(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    p = lwpipe(["-m", *QUICK, "sweep=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "alembic" not in p.stdout + p.stderr  # its plugin registry's INFO lines are silenced
    import yaml

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["solutions"] and all(len(s["values"]) == 2 for s in result["solutions"])
    table = rows(sweep)
    assert [r["status"] for r in table] == ["completed", "completed"]
    finals = {(float(r["accuracy"]), float(r["compression_ratio"])) for r in table}
    assert {tuple(s["values"]) for s in result["solutions"]} <= finals  # what lwpipe returned is what it ran


@pytest.mark.parametrize("preset", ["optuna", "joblib", "submitit", "submitit_local", "ray"])
def test_presets_compose_and_validate(preset):
    """The launchers are built from the presets' settings (a real run: lwpipe -m sweep=joblib ...)."""
    recipe = validate(compose_recipe([f"sweep={preset}"]))
    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"sweep={preset}"], return_hydra_config=True)
    if preset == "optuna":
        assert list(cfg.hydra.sweeper.direction) == ["maximize", "maximize"]
        assert recipe.top.objective == ["accuracy", "compression_ratio"]
        return
    assert recipe.top.objective == ["accuracy"]
    target = cfg.hydra.launcher._target_
    plugin = target.rsplit(".", 2)[0]
    pytest.importorskip(plugin)  # the ray plugin is optional: without it the preset only composes
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == target.rsplit(".", 1)[1]


def test_a_validated_job_config_is_composed_once_and_is_what_a_fresh_compose_gives(monkeypatch):
    from types import SimpleNamespace

    from hydra.core.global_hydra import GlobalHydra
    from hydra.plugins.sweeper import Sweeper
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from lwpipe.jobs import reuse_validated_configs

    reuse_validated_configs()
    reuse_validated_configs()  # installing twice wraps once
    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", TINY, run_mode=RunMode.MULTIRUN)
        sweeper = SimpleNamespace(hydra_context=SimpleNamespace(config_loader=loader), config=master)
        composed = []
        real = type(loader).load_configuration
        monkeypatch.setattr(
            type(loader), "load_configuration", lambda self, *a, **k: composed.append(1) or real(self, *a, **k)
        )
        Sweeper.validate_batch_is_legal(sweeper, [["seed=1"], ["seed=2"]])
        assert len(composed) == 2
        launched = loader.load_sweep_config(master, ["seed=1"])  # what the basic launcher does next
        assert len(composed) == 2
        again = loader.load_sweep_config(master, ["seed=1"])  # taken once: composed afresh from then on
        assert len(composed) == 3 and again is not launched
        assert OmegaConf.to_yaml(launched) == OmegaConf.to_yaml(again) and launched.seed == 1
