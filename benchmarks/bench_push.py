"""Issue 12's last target: the tuned Deep Compression recipes past the paper, on the default data (8x8 digits).

    python benchmarks/bench_push.py [--seeds 0 1 2] [--recipes deep_compression_lenet5 ...] [--threads 1]

Runs each recipe by name in-process, from scratch (cache off), once per seed, and prints per run the
compression ratio (`compression_ratio` of the final record: dense float32 bytes / model.lwp bytes), the
trained baseline (the `train` record's accuracy in the same run), the final accuracy, the drop in points,
the bytes biases take in model.lwp and the seconds the run took; then per recipe the target on each seed
and on the mean: ratio >= TARGET and a drop of at most 0.5 point.
Extra `key=value` arguments are lwpipe overrides applied to every run (for trying settings).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lwpipe.artifact.decode import read, read_bytes
from lwpipe.artifact.inspect import rows
from lwpipe.cli import RECIPES
from lwpipe.config import validate
from lwpipe.runner import run

TARGETS = {"deep_compression_lenet5": 45.0, "deep_compression_lenet300": 55.0}
MAX_DROP = 0.5  # accuracy points below the trained baseline
COMMON = ["cache=false", "measure.latency=false", "logger.console=null"]


def one(recipe: str, seed: int, overrides: list[str], common: list[str] = COMMON) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"recipe={recipe}", *common, f"seed={seed}", *overrides])
        final = run(validate(cfg), Path(d))
        summary = json.loads((Path(d) / "summary.json").read_text())
        table = rows(read(read_bytes(Path(d) / "model.lwp")))
    base = next(r for r in summary["stages"] if r["stage"] == "train")["accuracy"]
    return {
        "ratio": final["compression_ratio"],
        "bytes": final["compressed_bytes"],
        "baseline": base,
        "accuracy": final["accuracy"],
        "drop": 100 * (base - final["accuracy"]),
        "bias_bytes": sum(r["bytes"] for r in table if r["layer"].endswith(".bias")),
        "layers": {r["layer"]: r["bytes"] for r in table},
        "stages": {r["stage"]: round(100 * r["accuracy"], 2) for r in summary["stages"]},
        "seconds": time.perf_counter() - start,
    }


def line(recipe: str, seed: int, r: dict) -> str:
    return (
        f"{recipe:28s} seed {seed}  ratio {r['ratio']:5.1f}x  model.lwp {r['bytes']:6d} B "
        f"(biases {r['bias_bytes']:4d})  "
        f"baseline {100 * r['baseline']:.2f}%  final {100 * r['accuracy']:.2f}%  drop {r['drop']:+.2f}  "
        f"{r['seconds']:5.0f} s"
    )


def verdict(recipe: str, runs: dict[int, dict]) -> str:
    target = TARGETS.get(recipe)
    if target is None:
        return f"{recipe}: no target"
    each = all(r["ratio"] >= target and r["drop"] <= MAX_DROP for r in runs.values())
    ratio = min(r["ratio"] for r in runs.values())
    drop = sum(r["drop"] for r in runs.values()) / len(runs)
    mean = ratio >= target and drop <= MAX_DROP
    return (
        f"target {recipe}: >= {target:.0f}x within {MAX_DROP} point: each seed {'MET' if each else 'MISSED'}; "
        f"mean drop {drop:+.2f}, lowest ratio {ratio:.1f}x: {'MET' if mean else 'MISSED'}"
    )


def seeds_main(doc: str, targets: dict, one, line, verdict) -> None:
    """The command line of a per-seed recipe benchmark: each recipe once per seed (`one`), a `line` a run,
    then the recipe's `verdict` over its seeds (bench_entropy.py uses it too)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=list(targets))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="lwpipe overrides for every run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for recipe in a.recipes:
        runs = {}
        for seed in a.seeds:
            runs[seed] = one(recipe, seed, a.overrides)
            print(line(recipe, seed, runs[seed]), flush=True)
        print(verdict(recipe, runs), flush=True)


if __name__ == "__main__":
    seeds_main(__doc__, TARGETS, one, line, verdict)
