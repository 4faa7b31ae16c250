"""Issue-11 targets: logging to MLflow and TensorBoard adds at most 5% to the default run's wall time,
and the console output fits 80 columns. Also prints what the report (report.png/.md) costs.

    python benchmarks/bench_logging.py [--repeats 3] [--in-process] [extra lwpipe overrides...]

Each repeat runs, back to back (so that machine noise hits the variants alike), `lwpipe cache=false`
(the default loggers: console, metrics.jsonl, report), the same with logger=[mlflow,tensorboard]
(a fresh local MLflow store), and the same with logger.report=null. Medians are compared.
--in-process times what the run itself spends inside each logger instead (less sensitive to load).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "default": [],
    "mlflow+tensorboard": ["logger=[mlflow,tensorboard]"],
    "no report": ["logger.report=null"],
}


def children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def one_run(extra: list[str], tmp: Path) -> tuple[float, float, int]:
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp))
    exe = shutil.which("lwpipe")
    cmd = ([exe] if exe else [sys.executable, "-m", "lwpipe.cli"]) + [
        "cache=false",
        f"hydra.run.dir={run_dir}",
        f"logger.mlflow.tracking_uri={tmp / 'mlruns'}",
        *extra,
    ]
    if not any(e.startswith("logger=") for e in extra):
        cmd.remove(f"logger.mlflow.tracking_uri={tmp / 'mlruns'}")
    t, cpu = time.perf_counter(), children_cpu()
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, children_cpu() - cpu  # cpu: the run and its MLflow helper process
    width = max(len(line) for line in (p.stdout + p.stderr).splitlines())
    shutil.rmtree(run_dir)
    return wall, cpu, width


class Timed:
    """A logger wrapper adding the seconds spent in its methods (on the run's own thread) to `spent`."""

    def __init__(self, inner, name: str, spent: dict):
        self.inner, self.name, self.spent = inner, name, spent

    def _timed(self, what: str, *args) -> None:
        t = time.perf_counter()
        getattr(self.inner, what)(*args)
        self.spent[self.name] = self.spent.get(self.name, 0.0) + time.perf_counter() - t

    def log(self, record: dict) -> None:
        self._timed("log", record)

    def close(self) -> None:
        self._timed("close")


def in_process(extra: list[str], repeats: int) -> None:
    """The time the run itself spends in each logger (building it included), against the run's wall:
    what a tracker adds to the run's critical path; machine load inflates both alike."""
    from hydra import compose, initialize_config_dir

    from lwpipe import loggers, runner
    from lwpipe.cli import RECIPES
    from lwpipe.config import validate

    def timed_build(cfg: dict, run_dir: Path) -> list:
        built = []
        for name, c in cfg.items():
            if c:
                t = time.perf_counter()
                (lg,) = loggers.build_loggers({name: c}, run_dir)
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
                built.append(Timed(lg, name, spent))
        return built

    runner.build_loggers = timed_build
    for i in range(repeats):
        with tempfile.TemporaryDirectory(prefix="lwpipe-bench-logging-") as tmp:
            overrides = [
                "cache=false",
                "logger=[mlflow,tensorboard]",
                f"logger.mlflow.tracking_uri={tmp}/mlruns",
                *extra,
            ]
            with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
                recipe = validate(compose(config_name="config", overrides=overrides))
            spent: dict[str, float] = {}
            t = time.perf_counter()
            runner.run(recipe, Path(tmp) / "run")
            wall = time.perf_counter() - t
            parts = "  ".join(f"{k} {v:.2f} s" for k, v in spent.items())
            tracking = spent.get("mlflow", 0.0) + spent.get("tensorboard", 0.0)
            print(f"in-process run {i + 1}: runner.run {wall:.2f} s; inside loggers: {parts}")
            print(
                f"  MLflow + TensorBoard on the run's path: {tracking:.2f} s = {100 * tracking / wall:.1f}% "
                f"(target <= 5%); the report: {100 * spent.get('report', 0.0) / wall:.1f}%",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--in-process", action="store_true", help="time spent inside each logger during runner.run")
    a, extra = p.parse_known_args()
    if a.in_process:
        in_process(extra, a.repeats)
        return
    walls: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpus: dict[str, list[float]] = {k: [] for k in VARIANTS}
    widths = []
    with tempfile.TemporaryDirectory(prefix="lwpipe-bench-logging-") as tmp:
        for i in range(a.repeats):
            for name, args in VARIANTS.items():
                wall, cpu, width = one_run([*args, *extra], Path(tmp))
                walls[name].append(wall)
                cpus[name].append(cpu)
                widths.append(width)
                print(
                    f"repeat {i + 1}: {name:<20} wall {wall:6.2f} s  cpu {cpu:6.2f} s  widest console line {width}",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in walls.items()}
    for k, v in med.items():
        print(f"median wall, {k:<20} {v:6.2f} s   cpu {statistics.median(cpus[k]):6.2f} s")
    added = med["mlflow+tensorboard"] / med["default"] - 1
    print(f"logging to MLflow + TensorBoard adds {100 * added:+.1f}% to the default run's wall (target <= 5%)")
    cpu_added = statistics.median(cpus["mlflow+tensorboard"]) / statistics.median(cpus["default"]) - 1
    print(f"  in CPU time (the MLflow helper process included, which runs beside the run): {100 * cpu_added:+.1f}%")
    print(
        f"the report adds {med['default'] - med['no report']:+.2f} s "
        f"({100 * (med['default'] / med['no report'] - 1):+.1f}%)"
    )
    print(f"widest console line (not a terminal: no bars): {max(widths)} columns (target <= 80)")


if __name__ == "__main__":
    main()
