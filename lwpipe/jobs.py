"""A job's share of the machine and its console tag, set before the recipe runs (lwpipe.cli).

`threads` (torch intra-op threads): 0 picks them from the launcher, so parallel jobs on one
machine do not oversubscribe its cores (each of 2 jobs with torch's default on 2 cores ran 4-6x
slower than with one thread each):

    joblib                  cores // n_jobs (n_jobs -1: one job per core)
    submitit (local, SLURM) hydra.launcher.cpus_per_task (what SLURM allots each job)
    ray                     hydra.launcher.ray.remote.num_cpus (what Ray allots each task)
    anything else           torch's default (all cores: jobs run one at a time)

Threads enter the stage cache's key (they change the last bits of CPU sums), so runs meant to
share entries across launchers set `threads` explicitly.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("lwpipe")
SWEEP_PID = "LWPIPE_SWEEP_PID"  # the launching process of a multirun, for its workers (watch_parent)
WATCHDOG = "lwpipe-parent-watchdog"
_job_dir: Path | None = None  # the directory of the job this process runs now (set by lwpipe.cli)


def launcher_threads(launcher, cores: int) -> int:
    """Threads per job for Hydra's launcher config; 0: leave torch's default."""
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if "joblib" in target:
        n = int(launcher.get("n_jobs") or 1)
        n = n if n > 0 else max(1, cores + 1 + n)  # joblib: -1 all cores, -2 all but one
        return max(1, cores // n)
    if "submitit" in target:
        return max(1, int(launcher.get("cpus_per_task") or 1))
    if "ray" in target.lower():
        remote = (launcher.get("ray") or {}).get("remote") or {}
        return max(1, int(remote.get("num_cpus") or 1))
    return 0


def configure(threads: int, hydra_cfg, multirun: bool) -> None:
    """Set this job's torch threads and, in a multirun, tag its console lines with its job number."""
    import torch

    chosen = threads or launcher_threads(hydra_cfg.launcher, os.cpu_count() or 1)
    if chosen:
        torch.set_num_threads(chosen)
    if multirun:
        tag_console(f"[job {hydra_cfg.job.num}] ")
        watch_parent()
    log.debug("torch threads: %d", torch.get_num_threads())


def watch_parent(poll: float = 0.5, grace: float = 3.0) -> None:
    """In a sweep's worker process (joblib, submitit_local, Ray), stop when the process that started it dies.

    Workers outlive a launching process killed with -9 (no launcher watches for that): they would run
    the jobs already handed to them, and a SIGTERM only ends the job at hand. Once per worker process
    a daemon thread polls its parent; when the parent is gone the job gets SIGTERM (it fails as an
    interrupted job, FAILED in its directory) and the process exits `grace` seconds later whatever it
    is doing. Nothing happens in the launching process itself (a single run, the basic launcher)."""
    launcher = os.environ.get(SWEEP_PID)
    if not launcher or launcher == str(os.getpid()) or any(t.name == WATCHDOG for t in threading.enumerate()):
        return
    threading.Thread(target=_stop_with_parent, args=(os.getppid(), poll, grace), name=WATCHDOG, daemon=True).start()


def _stop_with_parent(parent: int, poll: float, grace: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll)
    log.warning("the sweep's launching process (%d) is gone: this worker stops", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    # The job's own handler writes FAILED; an interrupt that lands in a finalizer (a weakref callback,
    # __del__) is swallowed ("Exception ignored in ..."), the job goes on, and only this exit ends it
    mark_interrupted(_job_dir)
    os._exit(143)  # 128 + SIGTERM, as if the signal had ended the process


def running(run_dir: Path | None) -> None:
    """Name the job this process runs now (None: none): a worker killed mid-job marks its directory."""
    global _job_dir
    _job_dir = run_dir


def mark_interrupted(run_dir: Path | None) -> None:
    """FAILED (interrupted) in an unfinished job's directory that holds no FAILED yet."""
    if run_dir is None or (run_dir / "FAILED").exists() or (run_dir / "summary.json").exists():
        return
    try:
        (run_dir / "FAILED").write_text("interrupted\n")
    except OSError:  # a directory gone meanwhile: nothing to mark
        pass


class Tagged(logging.Formatter):
    """Another formatter's lines, each with a prefix: parallel jobs' lines interleave on one console."""

    def __init__(self, inner: logging.Formatter | None, tag: str):
        super().__init__()
        self.inner, self.tag = inner or logging.Formatter(), tag

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.tag + line for line in self.inner.format(record).split("\n"))


def tag_console(tag: str) -> None:
    for h in logging.getLogger().handlers:
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr):
            inner = h.formatter.inner if isinstance(h.formatter, Tagged) else h.formatter
            h.setFormatter(Tagged(inner, tag))


def reuse_validated_configs() -> None:
    """Compose each sweep job's config once, not twice.

    A Hydra sweeper composes every job's config to validate the batch before launching it
    (Sweeper.validate_batch_is_legal), and the basic launcher then composes it again (~0.25 s
    each here, 10% of a 5-point distill sweep). Validation discards what it composed: it is kept
    instead, and the launcher's compose of the same overrides from the same sweep takes it (once;
    a config is then the launcher's to change). Launchers that compose in other processes (joblib,
    submitit, Ray) compose as before; the kept configs are dropped when their sweep's validation
    runs again."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.plugins.sweeper import Sweeper

    if getattr(ConfigLoaderImpl.load_sweep_config, "lwpipe_reuses", False):
        return
    compose, validate = ConfigLoaderImpl.load_sweep_config, Sweeper.validate_batch_is_legal
    validated: dict = {}
    recording = [False]

    def load_sweep_config(self, master_config, sweep_overrides):
        key = (id(self), id(master_config), tuple(sweep_overrides))
        if not recording[0] and key in validated:
            return validated.pop(key)
        config = compose(self, master_config, sweep_overrides)
        if recording[0]:
            validated[key] = config
        return config

    def validate_batch_is_legal(self, batch) -> None:
        validated.clear()  # a batch is launched before the next is validated
        recording[0] = True
        try:
            validate(self, batch)
        finally:
            recording[0] = False

    load_sweep_config.lwpipe_reuses = True
    ConfigLoaderImpl.load_sweep_config = load_sweep_config
    Sweeper.validate_batch_is_legal = validate_batch_is_legal


class PreflightCallback(Callback):
    """Before a multirun launches any job, in the launching process: the sweep directory is named,
    worker processes can tell that they are workers, and the cache directory every job will write
    is writable."""

    def on_multirun_start(self, config, **kwargs) -> None:
        from lwpipe.cache import check_writable
        from lwpipe.errors import LwpipeError

        # ${now:} and ${lwpipe_pid:} are cached resolvers: resolved here, their values travel with every
        # job's config to the workers (joblib, submitit, Ray), which would otherwise name a directory each
        log.debug("sweep directory: %s", config.hydra.sweep.dir)
        os.environ[SWEEP_PID] = str(os.getpid())
        settings = config.get("cache")
        enabled = settings if isinstance(settings, bool) else bool(settings.get("enabled", True))
        if enabled:
            try:
                check_writable(Path(str(settings.get("dir"))))
            except LwpipeError as e:
                print(f"lwpipe: error: {e}", file=sys.stderr)
                sys.exit(2)
