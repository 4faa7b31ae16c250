"""Sweeps on other launchers (submitit, Ray): each job's share of the cores, tagged console lines,
errors before any job starts, and the same numbers as the basic launcher."""

import csv
import importlib.util
import logging
import socket
import sys

import pytest
from omegaconf import OmegaConf

from hydra_plugins.lwpipe_ray_launcher import ray_launcher
from lwpipe.jobs import Tagged, launcher_threads
from tests.helpers import TINY
from tests.test_cli import lwpipe

QUICK = TINY + [
    "pipeline=[train,prune]",
    "stages.train.epochs=3",
    "stages.prune.finetune.epochs=1",
    "measure.latency=false",
    "threads=1",
]  # threads enter the cache key: the same on every launcher
NUMBERS = ("status", "accuracy", "compressed_bytes", "compression_ratio", "sparsity")


@pytest.mark.parametrize(
    "launcher, threads",
    [
        ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}, 4),
        ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -1}, 1),
        ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "cpus_per_task": 3}, 3),
        (
            {
                "_target_": "hydra_plugins.lwpipe_ray_launcher.ray_launcher.LwpipeRayLauncher",
                "ray": {"remote": {"num_cpus": 2}},
            },
            2,
        ),
        ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 0),
    ],
)
def test_each_parallel_job_gets_its_share_of_the_cores(launcher, threads):
    assert launcher_threads(OmegaConf.create(launcher), cores=8) == threads


def test_tagged_console_lines_carry_the_job_number():
    record = logging.LogRecord("lwpipe", logging.INFO, __file__, 1, "summary:\nrow", None, None)
    assert Tagged(logging.Formatter(), "[job 3] ").format(record) == "[job 3] summary:\n[job 3] row"


def test_sweep_ray_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SystemExit, match=r'sweep=ray needs Ray: pip install "lwpipe\[ray\]"'):
        ray_launcher.start_ray({})


def test_an_unreachable_ray_address_is_refused_at_once():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit, match=rf"address='127.0.0.1:{port}': no Ray cluster answers there"):
        ray_launcher.check_reachable(f"127.0.0.1:{port}")


@pytest.mark.slow
def test_an_unwritable_cache_is_refused_before_any_job(tmp_path):
    (tmp_path / "file").write_text("")
    p = lwpipe(
        [
            "-m",
            *QUICK,
            "stages.prune.sparsity=0.5,0.8",
            f"cache.dir={tmp_path / 'file' / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    assert p.returncode == 2 and "cache.dir=" in p.stderr and "cannot write there" in p.stderr, p.stderr
    assert not (tmp_path / "sweep" / "0").exists()


def numbers(sweep_dir):
    with open(sweep_dir / "summary.csv", newline="") as f:
        return [{k: r[k] for k in NUMBERS} for r in csv.DictReader(f)]


def the_sweep_dir(cwd):
    """The one sweep directory a sweep wrote under its default name (outputs/multiruns/default/<stamp>_<pid>)."""
    dirs = list((cwd / "outputs" / "multiruns" / "default").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    """The reference: the same 2-point sweep on Hydra's basic launcher, one job after the other."""
    tmp = tmp_path_factory.mktemp("basic")
    p = lwpipe(["-m", *QUICK, "stages.prune.sparsity=0.5,0.8", f"cache.dir={tmp / 'cache'}"], tmp)
    assert p.returncode == 0, p.stderr
    return numbers(the_sweep_dir(tmp))


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, extra",
    [
        ("joblib", []),
        ("submitit_local", []),
        ("ray", ["+hydra.launcher.ray.init.num_cpus=2"]),
    ],
)
def test_a_sweep_on_another_launcher_gives_the_basic_launchers_numbers(basic, tmp_path, monkeypatch, preset, extra):
    """Under the default directory name, whose ${lwpipe_pid:} each worker process would resolve to its own pid:
    one sweep directory, holding every job and a summary row per job."""
    if preset == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip('Ray is not installed (pip install "lwpipe[ray]")')
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    p = lwpipe(
        ["-m", f"sweep={preset}", *extra, *QUICK, "stages.prune.sparsity=0.5,0.8", f"cache.dir={tmp_path / 'cache'}"],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = the_sweep_dir(tmp_path)
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")) == ["0", "1"]
    assert numbers(sweep) == basic
    assert [r["status"] for r in basic] == ["completed", "completed"]
    assert (sweep / "pareto.png").exists()
    assert not list((tmp_path / "cache").glob("*.lock"))
    if preset == "submitit_local":  # each job a process of its own, its log in .submitit/<job id>/
        logs = list((sweep / ".submitit").glob("*/*_log.out"))
        assert len(logs) == 2 and all("run directory:" in f.read_text() for f in logs)
