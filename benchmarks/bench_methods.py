"""Issue 12's targets that are cheap to measure, on the default data (8x8 digits) and LeNet-300-100.

    python benchmarks/bench_methods.py [--seeds 0] [--threads 1]

Runs in-process, each recipe from scratch (cache off), and prints one line per run and the
targets: binary weights within 3 accuracy points of the trained baseline at model.lwp >= 25x;
factorize at energy 0.9 on fc1 then the classic chain within 1 point and a larger ratio than the
same chain without it. The ratio is the input model's dense float32 bytes / model.lwp bytes (the
runner's `compression_ratio` divides the *current* model's dense bytes, which factorize shrinks).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lwpipe.cli import RECIPES
from lwpipe.config import validate
from lwpipe.runner import run

COMMON = ["cache=false", "measure.latency=false", "logger.console=null"]
RUNS = {
    "baseline": ["pipeline=[train]"],
    "binary": ["pipeline=[train,prune,quantize,distill]", "stages.quantize.bits=1"],
    "binary_per_channel": ["pipeline=[train,prune,quantize,distill]", "stages.quantize.bits=1",
                           "stages.quantize.granularity=per_channel"],
    "ternary": ["pipeline=[train,prune,quantize,distill]", "stages.quantize.scheme=ternary"],
    "classic": [],
    "factorize_fc1": ["pipeline=[train,factorize,prune,share,quantize,distill]", "+stages.factorize.energy=0.9",
                      "+stages.factorize.layers=[fc1]", "+stages.factorize.finetune={epochs:5,lr:1.0e-3}"],
}
# the factors pruned less than the dense layers (fc1* names fc1.0 and fc1.1, which exist only after factorize)
RUNS["factorize_fc1_prune07"] = RUNS["factorize_fc1"] + ["stages.prune.layers={fc1*:{sparsity:0.7},fc3:{sparsity:0.7}}"]


def one(overrides: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*COMMON, f"seed={seed}", *overrides])
        final = run(validate(cfg), Path(d))
        summary = json.loads((Path(d) / "summary.json").read_text())
    base = summary["baseline"]
    return {"accuracy": final["accuracy"], "bytes": final["compressed_bytes"],
            "ratio": base["dense_bytes"] / final["compressed_bytes"], "sparsity": final["sparsity"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for seed in a.seeds:
        r = {}
        for name, overrides in RUNS.items():
            r[name] = one(overrides, seed)
            print(f"seed {seed} {name:20s} accuracy {r[name]['accuracy']:.4f}  model.lwp {r[name]['bytes']:6d} B  "
                  f"{r[name]['ratio']:6.1f}x  sparsity {r[name]['sparsity']:.3f}", flush=True)
        base = r["baseline"]["accuracy"]
        drop = (base - r["binary"]["accuracy"]) * 100
        ok = drop <= 3 and r["binary"]["ratio"] >= 25
        print(f"target binary: within 3 points ({drop:+.2f} drop) and >= 25x ({r['binary']['ratio']:.1f}x): "
              f"{'met' if ok else 'MISSED'}")
        drop = (base - r["factorize_fc1"]["accuracy"]) * 100
        ok = drop <= 1 and r["factorize_fc1"]["ratio"] > r["classic"]["ratio"]
        print(f"target factorize: within 1 point ({drop:+.2f} drop) and more than the classic chain "
              f"({r['factorize_fc1']['ratio']:.1f}x vs {r['classic']['ratio']:.1f}x): {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
