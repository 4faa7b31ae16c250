"""Issue 12's targets that are cheap to measure, on the default data (8x8 digits) and LeNet-300-100.

    python benchmarks/bench_methods.py [--seeds 0] [--threads 1] [--part all|methods|auto_bits]

Runs in-process, each recipe from scratch (cache off), and prints one line per run and the
targets: binary weights within 3 accuracy points of the trained baseline at model.lwp >= 25x;
factorize at energy 0.9 on fc1 then the classic chain within 1 point and a larger ratio than the
same chain without it. The ratio is the input model's dense float32 bytes / model.lwp bytes (the
runner's `compression_ratio` divides the *current* model's dense bytes, which factorize shrinks).

`--part auto_bits`: `quantize.bits: auto` at an average of 3 bits per kept weight against uniform 3 bits,
same pipeline [train, prune, quantize(, distill)], same seeds and fine-tunes: held-out accuracy and loss
right after quantizing (fine-tune epochs 0: the clearest signal of the allotment), after the quantize
fine-tune and distill, model.lwp bytes and average bits. Train and prune come from a shared stage cache,
so both arms start from the very same pruned model.
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
    "binary_per_channel": [
        "pipeline=[train,prune,quantize,distill]",
        "stages.quantize.bits=1",
        "stages.quantize.granularity=per_channel",
    ],
    "ternary": ["pipeline=[train,prune,quantize,distill]", "stages.quantize.scheme=ternary"],
    "classic": [],
    "factorize_fc1": [
        "pipeline=[train,factorize,prune,share,quantize,distill]",
        "+stages.factorize.energy=0.9",
        "+stages.factorize.layers=[fc1]",
        "+stages.factorize.finetune={epochs:5,lr:1.0e-3}",
    ],
}
# the factors pruned less than the dense layers (fc1* names fc1.0 and fc1.1, which exist only after factorize)
RUNS["factorize_fc1_prune07"] = RUNS["factorize_fc1"] + ["stages.prune.layers={fc1*:{sparsity:0.7},fc3:{sparsity:0.7}}"]


NO_FINETUNE = ["pipeline=[train,prune,quantize]", "stages.quantize.finetune.epochs=0"]


def one(overrides: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*COMMON, f"seed={seed}", *overrides])
        final = run(validate(cfg), Path(d))
        summary = json.loads((Path(d) / "summary.json").read_text())
    base = summary["baseline"]
    return {
        "accuracy": final["accuracy"],
        "bytes": final["compressed_bytes"],
        "ratio": base["dense_bytes"] / final["compressed_bytes"],
        "sparsity": final["sparsity"],
    }


def quantized(overrides: list[str], seed: int, cache_dir: str) -> dict:
    """One [train, prune, quantize, ...] run with the stage cache in `cache_dir`: the final record, the quantize
    stage's record and the model.lwp size."""
    with tempfile.TemporaryDirectory() as d:
        with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[
                    f"cache.dir={cache_dir}",
                    "measure.latency=false",
                    "logger.console=null",
                    f"seed={seed}",
                    *overrides,
                ],
            )
        final = run(validate(cfg), Path(d))
        summary = json.loads((Path(d) / "summary.json").read_text())
    quant = next(r for r in summary["stages"] if r["stage"] == "quantize")
    return {"final": final, "quantize": quant, "bytes": final["compressed_bytes"]}


def auto_bits(seed: int, budget: int) -> dict:
    """bits: auto vs uniform `budget` bits at the same average bits per kept weight; returns both rows."""
    arms = {
        f"uniform {budget}": [f"stages.quantize.bits={budget}"],
        f"auto {budget}": ["stages.quantize.bits=auto", f"+stages.quantize.budget={budget}"],
    }
    rows = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for name, arm in arms.items():
            before = quantized([*NO_FINETUNE, *arm], seed, cache_dir)
            after = quantized(["pipeline=[train,prune,quantize,distill]", *arm], seed, cache_dir)
            q = after["quantize"]
            rows[name] = r = {
                "before": before["final"]["accuracy"],
                "before_loss": before["final"]["loss"],
                "quantize": q["accuracy"],
                "distill": after["final"]["accuracy"],
                "bytes": after["bytes"],
                "avg_bits": q.get("avg_bits_per_weight", float(budget)),
                "bits": q.get("bits_allotted", f"all {budget}"),
            }
            print(
                f"seed {seed} {name:9s} before fine-tune {r['before']:.4f} (loss {r['before_loss']:.4f})  "
                f"after quantize fine-tune {r['quantize']:.4f}  after distill {r['distill']:.4f}  "
                f"model.lwp {r['bytes']:6d} B  avg bits {r['avg_bits']:.3f}  bits {r['bits']}",
                flush=True,
            )
            if "predicted_loss_increase" in q:
                print(
                    f"  {name}: loss increase predicted {q['predicted_loss_increase']:.4g}, measured (test set) "
                    f"{q['measured_loss_increase']:.4g}"
                )
    return rows


def auto_bits_target(results: list[dict], budget: int) -> None:
    """Means over seeds, and the target: auto better than uniform before fine-tune at no more bits."""

    def mean(name, key):
        return sum(r[name][key] for r in results) / len(results)

    u, a = f"uniform {budget}", f"auto {budget}"
    for name in (u, a):
        print(
            f"mean of {len(results)} seeds, {name:9s}: before fine-tune {100 * mean(name, 'before'):.2f}%  "
            f"after quantize fine-tune {100 * mean(name, 'quantize'):.2f}%  after distill "
            f"{100 * mean(name, 'distill'):.2f}%  model.lwp {mean(name, 'bytes'):.0f} B  "
            f"avg bits {mean(name, 'avg_bits'):.3f}"
        )
    wins = sum(r[a]["before"] > r[u]["before"] for r in results)
    ok = mean(a, "before") > mean(u, "before") and mean(a, "avg_bits") <= budget
    print(
        f"target auto bits: bits: auto at {budget} bits per weight better than uniform {budget} before fine-tune "
        f"(mean {100 * mean(a, 'before'):.2f}% vs {100 * mean(u, 'before'):.2f}%, better in {wins} of "
        f"{len(results)} seeds): {'met' if ok else 'MISSED'}; after distill {100 * mean(a, 'distill'):.2f}% vs "
        f"{100 * mean(u, 'distill'):.2f}%"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", choices=["all", "methods", "auto_bits"], default="all")
    p.add_argument("--budget", type=int, default=3, help="--part auto_bits: the bits per weight both arms get")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.part in ("all", "auto_bits"):
        auto_bits_target([auto_bits(seed, a.budget) for seed in a.seeds], a.budget)
    for seed in a.seeds if a.part != "auto_bits" else []:
        r = {}
        for name, overrides in RUNS.items():
            r[name] = one(overrides, seed)
            print(
                f"seed {seed} {name:20s} accuracy {r[name]['accuracy']:.4f}  model.lwp {r[name]['bytes']:6d} B  "
                f"{r[name]['ratio']:6.1f}x  sparsity {r[name]['sparsity']:.3f}",
                flush=True,
            )
        base = r["baseline"]["accuracy"]
        drop = (base - r["binary"]["accuracy"]) * 100
        ok = drop <= 3 and r["binary"]["ratio"] >= 25
        print(
            f"target binary: within 3 points ({drop:+.2f} drop) and >= 25x ({r['binary']['ratio']:.1f}x): "
            f"{'met' if ok else 'MISSED'}"
        )
        drop = (base - r["factorize_fc1"]["accuracy"]) * 100
        ok = drop <= 1 and r["factorize_fc1"]["ratio"] > r["classic"]["ratio"]
        print(
            f"target factorize: within 1 point ({drop:+.2f} drop) and more than the classic chain "
            f"({r['factorize_fc1']['ratio']:.1f}x vs {r['classic']['ratio']:.1f}x): {'met' if ok else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
