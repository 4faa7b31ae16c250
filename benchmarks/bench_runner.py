"""Issue-2 targets: the default `lwpipe` run's wall time (< 60 s on 2 cores) and the runner's
overhead (evaluation, metrics, size encoding, logging, checkpoints, data/model build) against the
stages' own time (< 10%).

    python benchmarks/bench_runner.py [--repeats 3] [extra lwpipe overrides...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(extra: list[str]) -> tuple[float, dict]:
    run_dir = Path(tempfile.mkdtemp(prefix="lwpipe-bench-"))
    exe = shutil.which("lwpipe")
    cmd = ([exe] if exe else [sys.executable, "-m", "lwpipe.cli"]) + ["cache=false", f"hydra.run.dir={run_dir}", *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir)
    return wall, summary


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    a, extra = p.parse_known_args()
    walls, ratios = [], []
    for i in range(a.repeats):
        wall, s = one_run(extra)
        runner = s["seconds"]
        stages = s["stage_seconds"]
        timing = sum(r.get("latency_seconds", 0) for r in [s["baseline"], *s["stages"]])
        overhead = runner - stages - timing  # latency measurement (lwpipe/speed.py) is not runner overhead
        evals = sum(r.get("eval_seconds", 0) for r in [s["baseline"], *s["stages"]])
        walls.append(wall)
        ratios.append(overhead / stages)
        print(
            f"run {i + 1}: wall {wall:.1f} s (process start + imports + run); runner.run {runner:.2f} s = "
            f"stages {stages:.2f} s + overhead {overhead:.2f} s ({100 * overhead / stages:.1f}%; "
            f"stage_end/baseline evaluation+encoding {evals:.2f} s)"
        )
    print(f"default run wall: median {statistics.median(walls):.1f} s (target < 60 s)")
    print(f"runner overhead: median {100 * statistics.median(ratios):.1f}% of stage time (target < 10%)")


if __name__ == "__main__":
    main()
