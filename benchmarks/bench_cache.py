"""The stage cache's two targets, timed through the `lwpipe` command on the default recipe.

    python benchmarks/bench_cache.py [--uncached] [--in-process] [extra overrides...]

0. start-up: `python -c "import lwpipe.cli, lwpipe.config, lwpipe.runner"` (the interpreter and the
   imports every run pays: torch, Hydra, lwpipe), median of 3                   -> S
1. one full run with a cold cache                        -> T
2. the identical run again (every stage cached)          -> target <= 0.10 T, and issue 13's
   target: at most start-up + 1 s (printed as its own line: rerun - S <= 1 s)
3. `lwpipe -m stages.distill.alpha=<5 values>`, warm cache -> target <= 1.5 T
   (train, prune, share and quantize come from the cache; distill runs 5 times)
--uncached also times the same sweep with cache=false, for comparison (about 5 T).

    python benchmarks/bench_cache.py --race        # issue 13's targets (no timing targets)

4. two `lwpipe` processes started together on a cold cache, same recipe: how many times each
   stage was computed (target: once) and whether both finished with the same numbers
5. a 4-point sweep with a shared cache on the basic launcher, sweep=submitit_local and
   sweep=ray (when Ray is installed): the same summary.csv numbers (target: identical)
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


STARTUP = "import lwpipe.cli, lwpipe.config, lwpipe.runner"


def startup_seconds(cwd: Path, repeats: int = 3) -> float:
    """Median wall time of a process that only starts and imports what every `lwpipe` run imports."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP], cwd=cwd, check=True)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


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


def race_and_launchers(extra: list[str]) -> None:
    """Targets 4 and 5 (module docstring), on the tiny model: counts and equality, not time."""
    import csv
    import importlib.util

    quick = [
        "model=tiny",
        "data=blobs",
        "~stages.prune.layers",
        "pipeline=[train,prune,share]",
        "stages.train.epochs=20",
        "measure.latency=false",
        "threads=1",
        *extra,
    ]
    exe = shutil.which("lwpipe")
    base = [exe] if exe else [sys.executable, "-m", "lwpipe.cli"]
    quick.append("logger.console=null")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        procs = [
            subprocess.Popen(
                base + quick + [f"cache.dir={tmp / 'race'}", f"hydra.run.dir={tmp / f'r{i}'}"],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        codes = [p.wait() for p in procs]
        ends = [
            [json.loads(line) for line in (tmp / f"r{i}" / "metrics.jsonl").read_text().splitlines()] for i in range(2)
        ]
        ends = [[r for r in e if r["event"] == "stage_end"] for e in ends]
        computed = [sum(not r["cached"] for r in step) for step in zip(*ends)]
        same = [r["accuracy"] for r in ends[0]] == [r["accuracy"] for r in ends[1]]
        print(
            f"two jobs racing on a cold cache: exit codes {codes}; times each stage was computed "
            f"{dict(zip([r['stage'] for r in ends[0]], computed))}  target: 1 each: "
            f"{'ok' if computed == [1] * len(computed) else 'MISSED'}; same numbers: {same}"
        )

        def table(sweep_dir: Path) -> list[tuple]:
            with open(sweep_dir / "summary.csv", newline="") as f:
                return [(r["status"], r["accuracy"], r["compressed_bytes"]) for r in csv.DictReader(f)]

        points = "stages.prune.sparsity=0.5,0.6,0.7,0.8"
        presets = [("basic", []), ("submitit_local", ["sweep=submitit_local"])]
        if importlib.util.find_spec("ray"):
            presets.append(("ray", ["sweep=ray", "+hydra.launcher.ray.init.num_cpus=2"]))
        else:
            print('ray: not installed (pip install -e ".[ray]"): skipped')
        tables = {}
        for name, args in presets:
            t = time.perf_counter()
            p = subprocess.run(
                base
                + [
                    "-m",
                    *args,
                    *quick,
                    points,
                    f"cache.dir={tmp / name}",
                    f"hydra.sweep.dir={tmp / ('sweep_' + name)}",
                ],
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            tables[name] = table(tmp / f"sweep_{name}") if p.returncode == 0 else p.stderr[-500:]
            print(
                f"4-point sweep, shared cache, {name:<15} {time.perf_counter() - t:7.1f} s  "
                f"summary.csv numbers {'= basic: ok' if tables[name] == tables['basic'] else 'DIFFER: MISSED'}"
                f"  {tables[name]}"
            )


def main() -> None:
    if "--race" in sys.argv:
        race_and_launchers([a for a in sys.argv[1:] if a != "--race"])
        return
    uncached = "--uncached" in sys.argv
    extra = [a for a in sys.argv[1:] if a not in ("--uncached", "--in-process")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = [f"cache.dir={tmp / 'cache'}"]
        if "--in-process" in sys.argv:
            job, sweep_ = in_process(tmp)
            full, rerun = job(extra + cache), job(extra + cache)
            rows = [
                ("one full run, cold cache", full, None),
                ("identical rerun", rerun, 0.10),
                ("5-point distill sweep, warm cache", sweep_(extra + cache), 1.5),
            ]
            if uncached:
                rows.append(("5-point distill sweep, cache=false", sweep_(extra + ["cache=false"]), None))
            report(rows, extra, "in-process runner.run")
            return
        startup = startup_seconds(tmp)
        full = lwpipe(extra + cache + [f"hydra.run.dir={tmp / 'full'}"], tmp)
        rerun = lwpipe(extra + cache + [f"hydra.run.dir={tmp / 'rerun'}"], tmp)
        sweep = lwpipe(
            ["-m", f"stages.distill.alpha={ALPHAS}", *extra, *cache, f"hydra.sweep.dir={tmp / 'sweep'}"], tmp
        )
        rows = [
            ("one full run, cold cache", full, None),
            (f"identical rerun ({cached_stages(tmp / 'rerun')})", rerun, 0.10),
            (f"5-point distill sweep, warm cache ({cached_stages(tmp / 'sweep')})", sweep, 1.5),
        ]
        if uncached:
            rows.append(
                (
                    "5-point distill sweep, cache=false",
                    lwpipe(
                        [
                            "-m",
                            f"stages.distill.alpha={ALPHAS}",
                            *extra,
                            "cache=false",
                            f"hydra.sweep.dir={tmp / 'sweep_uncached'}",
                        ],
                        tmp,
                    ),
                    None,
                )
            )
    report(rows, extra, "lwpipe processes")
    over = rerun - startup
    print(f"{'start-up (python -c ' + repr(STARTUP) + ')':<58} {startup:8.2f} s")
    print(
        f"{'identical rerun minus start-up':<58} {over:8.2f} s         target <= 1.00 s: "
        f"{'ok' if over <= 1.0 else 'MISSED'}"
    )


def report(rows, extra: list[str], how: str) -> None:
    full = rows[0][1]
    print(
        f"recipe: default{(' + ' + ' '.join(extra)) if extra else ''}; timed: {how}; cores: {os.cpu_count()}; "
        f"load average now: {os.getloadavg()[0]:.2f}"
    )
    for name, seconds, target in rows:
        ratio = seconds / full
        verdict = "" if target is None else f"  target <= {target:.2f}x: {'ok' if ratio <= target else 'MISSED'}"
        print(f"{name:<58} {seconds:8.2f} s  {ratio:5.2f}x{verdict}")


if __name__ == "__main__":
    main()
