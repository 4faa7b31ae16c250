"""lwpipe's Hydra launcher for Ray (`sweep=ray`): each job a Ray task in its own worker process.

The local half of hydra-ray-launcher, kept here because that plugin pins cloudpickle<3, which
conflicts with joblib >= 1.5 (scikit-learn's dependency), so `pip install "lwpipe[ray]"` needs Ray alone.
It joins the cluster at `ray.init.address` (RAY_ADDRESS) and starts a local Ray when that is unset;
an unreachable address, or Ray not installed, is a one-line error before any job starts.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def _run_job(hydra_context, sweep_config, task_function, singleton_state) -> JobReturn:
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def check_reachable(address: str | None, seconds: float = 5.0) -> None:
    """Ray retries an unreachable address for minutes: refuse it at once (a TCP connect to host:port)."""
    if not address or address in ("auto", "local"):
        return  # no address: a local Ray; auto: Ray finds (or reports missing) a cluster on this host
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "localhost", int(port)), timeout=seconds).close()
    except (OSError, ValueError) as e:
        sys.exit(
            f"lwpipe: error: RAY_ADDRESS / hydra.launcher.ray.init.address={address!r}: no Ray cluster "
            f"answers there ({e}); unset RAY_ADDRESS to start a local Ray"
        )


def start_ray(init: dict):
    """ray, initialised: joined to init['address'], or a new local Ray."""
    try:
        import ray
    except ImportError:
        sys.exit('lwpipe: error: sweep=ray needs Ray: pip install "lwpipe[ray]"')
    if not ray.is_initialized():
        address = init.get("address")
        check_reachable(address)
        try:
            ray.init(**{k: v for k, v in init.items() if v is not None}, log_to_driver=True)
        except Exception as e:  # ConnectionError, or a timeout, depending on the Ray version
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            sys.exit(
                f"lwpipe: error: RAY_ADDRESS / hydra.launcher.ray.init.address={address!r}: cannot join a "
                f"Ray cluster there ({first}); unset RAY_ADDRESS to start a local Ray"
            )
    return ray


class LwpipeRayLauncher(Launcher):
    def __init__(self, ray: DictConfig) -> None:
        self.ray_cfg = ray
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        init = OmegaConf.to_container(self.ray_cfg.get("init") or {}, resolve=True)
        remote = OmegaConf.to_container(self.ray_cfg.get("remote") or {}, resolve=True)
        ray = start_ray(init)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Ray: %d jobs, sweep output dir: %s", len(job_overrides), sweep_dir)
        task = ray.remote(**remote)(_run_job) if remote else ray.remote(_run_job)
        runs = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"ray_{idx}"
                sweep_config.hydra.job.num = idx
            runs.append(task.remote(self.hydra_context, sweep_config, self.task_function, Singleton.get_state()))
        return ray.get(runs)
