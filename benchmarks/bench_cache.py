"""The stage cache's two targets, timed through the `lwpipe` command on the default recipe.

    python benchmarks/bench_cache.py [--uncached] [--in-process] [extra overrides...]

1. one full run with a cold cache                        -> T
2. the identical run again (every stage cached)          -> target <= 0.10 T
3. `lwpipe -m stages.distill.alpha=<5 values>`, warm cache -> target <= 1.5 T
   (train, prune, share and quantize come from the cache; distill runs 5 times)
--uncached also times the same sweep with cache=false, for comparison (about 5 T).
Wall-clock times of whole processes, interpreter start-up included; with
--in-process, of lwpipe.runner.run calls in this process (what the cache itself
controls, without start-up and without noise from other processes' imports).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALPHAS = "0.2,0.4,0.6,0.8,0.9"  # none is the recipe's own alpha, so no sweep point is a full cache hit


def lwpipe(args: list[str], cwd: Path) -> float:
    exe = shutil.which("lwpipe")
    cmd = ([exe] if exe else [sys.executable, "-m", "lwpipe.cli"]) + args + ["logger.console=null"]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return seconds


def cached_stages(root: Path) -> str:
    """How many stage_end records under root came from the cache: the proof that it was used."""
    ends = [json.loads(line) for f in root.glob("**/metrics.jsonl") for line in f.read_text().splitlines()]
    ends = [r for r in ends if r["event"] == "stage_end"]
    return f"{sum(r['cached'] for r in ends)}/{len(ends)} stages cached"


def in_process(cwd: Path):
    """The same measurements through lwpipe.runner.run: a job is what the basic launcher runs per job."""
    from hydra import compose, initialize_config_dir

    from lwpipe.cli import RECIPES
    from lwpipe.config import validate
    from lwpipe.runner import run

    counter = iter(range(1000))

    def job(overrides: list[str]) -> float:
        with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
            recipe = validate(compose(config_name="config", overrides=overrides + ["logger.console=null"]))
        t = time.perf_counter()
        run(recipe, cwd / f"run{next(counter)}")
        return time.perf_counter() - t

    def sweep(overrides: list[str]) -> float:
        return sum(job(overrides + [f"stages.distill.alpha={a}"]) for a in ALPHAS.split(","))

    return job, sweep


def main() -> None:
    uncached = "--uncached" in sys.argv
    extra = [a for a in sys.argv[1:] if a not in ("--uncached", "--in-process")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = [f"cache.dir={tmp / 'cache'}"]
        if "--in-process" in sys.argv:
            job, sweep_ = in_process(tmp)
            full, rerun = job(extra + cache), job(extra + cache)
            rows = [("one full run, cold cache", full, None), ("identical rerun", rerun, 0.10),
                    ("5-point distill sweep, warm cache", sweep_(extra + cache), 1.5)]
            if uncached:
                rows.append(("5-point distill sweep, cache=false", sweep_(extra + ["cache=false"]), None))
            report(rows, extra, "in-process runner.run")
            return
        full = lwpipe(extra + cache + [f"hydra.run.dir={tmp / 'full'}"], tmp)
        rerun = lwpipe(extra + cache + [f"hydra.run.dir={tmp / 'rerun'}"], tmp)
        sweep = lwpipe(["-m", f"stages.distill.alpha={ALPHAS}", *extra, *cache,
                        f"hydra.sweep.dir={tmp / 'sweep'}"], tmp)
        rows = [("one full run, cold cache", full, None),
                (f"identical rerun ({cached_stages(tmp / 'rerun')})", rerun, 0.10),
                (f"5-point distill sweep, warm cache ({cached_stages(tmp / 'sweep')})", sweep, 1.5)]
        if uncached:
            rows.append(("5-point distill sweep, cache=false",
                         lwpipe(["-m", f"stages.distill.alpha={ALPHAS}", *extra, "cache=false",
                                 f"hydra.sweep.dir={tmp / 'sweep_uncached'}"], tmp), None))
    report(rows, extra, "lwpipe processes")


def report(rows, extra: list[str], how: str) -> None:
    full = rows[0][1]
    print(f"recipe: default{(' + ' + ' '.join(extra)) if extra else ''}; timed: {how}; cores: {os.cpu_count()}; "
          f"load average now: {os.getloadavg()[0]:.2f}")
    for name, seconds, target in rows:
        ratio = seconds / full
        verdict = "" if target is None else f"  target <= {target:.2f}x: {'ok' if ratio <= target else 'MISSED'}"
        print(f"{name:<58} {seconds:8.2f} s  {ratio:5.2f}x{verdict}")


if __name__ == "__main__":
    main()
