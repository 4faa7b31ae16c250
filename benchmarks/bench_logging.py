"""Issue-11 targets: logging to MLflow and TensorBoard adds at most 5% to the default run's wall time,
and the console output fits 80 columns. Also prints what the report (report.png/.md) costs.

    python benchmarks/bench_logging.py [--repeats 3] [extra lwpipe overrides...]

Each repeat runs, back to back (so that machine noise hits the variants alike), `lwpipe cache=false`
(the default loggers: console, metrics.jsonl, report), the same with logger=[mlflow,tensorboard]
(a fresh local MLflow store), and the same with logger.report=null. Medians are compared.
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
        "cache=false", f"hydra.run.dir={run_dir}", f"logger.mlflow.tracking_uri={tmp / 'mlruns'}", *extra]
    if not any(e.startswith("logger=") for e in extra):
        cmd.remove(f"logger.mlflow.tracking_uri={tmp / 'mlruns'}")
    t, cpu = time.perf_counter(), children_cpu()
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, children_cpu() - cpu  # cpu: the run and its MLflow helper process
    width = max(len(line) for line in (p.stdout + p.stderr).splitlines())
    shutil.rmtree(run_dir)
    return wall, cpu, width


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    a, extra = p.parse_known_args()
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
                print(f"repeat {i + 1}: {name:<20} wall {wall:6.2f} s  cpu {cpu:6.2f} s  widest console line {width}",
                      flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    for k, v in med.items():
        print(f"median wall, {k:<20} {v:6.2f} s   cpu {statistics.median(cpus[k]):6.2f} s")
    added = med["mlflow+tensorboard"] / med["default"] - 1
    print(f"logging to MLflow + TensorBoard adds {100 * added:+.1f}% to the default run's wall (target <= 5%)")
    cpu_added = statistics.median(cpus["mlflow+tensorboard"]) / statistics.median(cpus["default"]) - 1
    print(f"  in CPU time (the MLflow helper process included, which runs beside the run): {100 * cpu_added:+.1f}%")
    print(f"the report adds {med['default'] - med['no report']:+.2f} s ({100 * (med['default'] / med['no report'] - 1):+.1f}%)")
    print(f"widest console line (not a terminal: no bars): {max(widths)} columns (target <= 80)")


if __name__ == "__main__":
    main()
