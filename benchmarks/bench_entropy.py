"""Entropy pruning (sparse variational dropout) recipes on the default data (8x8 digits): size, quality, cost.

    python benchmarks/bench_entropy.py [--seeds 0 1 2] [--recipes entropy_lenet5 entropy_lenet300] [--threads 1]

Each recipe runs from scratch (cache off), once per seed, in-process. Per run: the compression ratio (dense
float32 bytes / model.lwp bytes), the trained baseline (the same run's `train` record), the final accuracy,
the drop in points, the prune stage's kept fraction per layer, and the prune stage's seconds against the
seconds the same number of ordinary fine-tuning epochs take (a plain `fit` of the same model on the same
data, timed right after the run: on a shared CPU the load changes between the two), and, steadier, one
variational epoch's cost in ordinary epochs, the two alternated three times, with the stage's cost it
implies ((variational epochs x that + fine-tune epochs) / all its epochs). Then per recipe the targets:
ratio >= TARGET and a drop of at most 0.5 point on every seed; the prune stage at most 3x ordinary
fine-tuning. Extra `key=value` arguments are lwpipe overrides for every run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).parent))
from bench_push import COMMON, MAX_DROP, seeds_main  # noqa: E402

from lwpipe.cli import RECIPES  # noqa: E402
from lwpipe.config import TrainSettings, validate  # noqa: E402
from lwpipe.constraints import compressible_layers  # noqa: E402
from lwpipe.context import Context  # noqa: E402
from lwpipe.runner import build_data, build_model, run  # noqa: E402
from lwpipe.training import fit  # noqa: E402
from lwpipe.variational import kl_schedule, train_variational  # noqa: E402

TARGETS = {"entropy_lenet5": 110.0, "entropy_lenet300": 85.0}
MAX_COST = 3.0  # prune stage seconds / seconds of as many ordinary fine-tuning epochs


def plain_epochs_seconds(recipe, epochs: int, lr: float, seed: int) -> float:
    """Seconds `epochs` ordinary fine-tuning epochs of the recipe's model take on its data."""
    torch.manual_seed(seed)
    model, data = build_model(recipe.top.model), build_data(recipe.top.data)
    ctx = Context(data=data, seed=seed, run_dir=Path("."), batch_size=recipe.top.data.get("batch_size", 64))
    start = time.perf_counter()
    fit(model, ctx.train_loader(), TrainSettings(epochs=epochs, lr=lr), loss_fn=ctx.loss)
    return time.perf_counter() - start


def epoch_cost(recipe, seed: int, rounds: int = 3) -> float:
    """One variational epoch's seconds / one ordinary epoch's, the two alternated `rounds` times on the same
    model and data (a shared CPU's load drifts; alternating cancels most of it)."""
    cfg = next(s.config for s in recipe.steps if s.type == "prune")
    torch.manual_seed(seed)
    model, data = build_model(recipe.top.model), build_data(recipe.top.data)
    ctx = Context(data=data, seed=seed, run_dir=Path("."), batch_size=recipe.top.data.get("batch_size", 64))
    layers, loader = dict(compressible_layers(model)), ctx.train_loader()
    one_epoch = TrainSettings(epochs=1, lr=cfg.variational.lr)
    vd = plain = 0.0
    train = lambda loss, groups: fit(model, loader, one_epoch, loss_fn=loss, params=groups)  # noqa: E731
    for _ in range(rounds):
        start = time.perf_counter()
        train_variational(
            model, layers, train, ctx.loss, len(data.train), kl_schedule(cfg.kl_weight, 0), cfg.score, cfg.sigma_lr
        )
        mid = time.perf_counter()
        fit(model, loader, one_epoch, loss_fn=ctx.loss)
        vd, plain = vd + mid - start, plain + time.perf_counter() - mid
    return vd / plain


def one(name: str, seed: int, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"recipe={name}", *COMMON, f"seed={seed}", *overrides])
    recipe = validate(cfg)
    with tempfile.TemporaryDirectory() as d:
        final = run(recipe, Path(d))
        summary = json.loads((Path(d) / "summary.json").read_text())
    records = {r["stage"]: r for r in summary["stages"]}
    p = cfg.stages.prune
    steps = p.get("steps", 1) if p.get("schedule") == "gradual" else 1
    epochs = steps * (p.variational.epochs + p.get("finetune", {}).get("epochs", 0))
    plain = plain_epochs_seconds(recipe, epochs, p.variational.lr, seed)
    per_epoch = epoch_cost(recipe, seed)
    ft = p.get("finetune", {}).get("epochs", 0)
    stage_cost = (p.variational.epochs * per_epoch + ft) / (p.variational.epochs + ft)
    base = records["train"]["accuracy"]
    return {
        "ratio": final["compression_ratio"],
        "bytes": final["compressed_bytes"],
        "baseline": base,
        "accuracy": final["accuracy"],
        "drop": 100 * (base - final["accuracy"]),
        "kept": records["prune"]["kept_fraction"],
        "prune_s": records["prune"]["seconds"],
        "plain_s": plain,
        "epochs": epochs,
        "per_epoch": per_epoch,
        "cost": stage_cost,
        "stages": " ".join(f"{n} {100 * r['accuracy']:.2f}" for n, r in records.items()),
    }


def line(name: str, seed: int, r: dict) -> str:
    kept = " ".join(f"{n}={v:.3f}" for n, v in r["kept"].items())
    return (
        f"{name:18s} seed {seed}  ratio {r['ratio']:6.1f}x  model.lwp {r['bytes']:5d} B  baseline "
        f"{100 * r['baseline']:.2f}%  final {100 * r['accuracy']:.2f}%  drop {r['drop']:+.2f}  kept {kept}  "
        f"prune {r['prune_s']:.1f} s vs {r['epochs']} plain epochs {r['plain_s']:.1f} s "
        f"({r['prune_s'] / r['plain_s']:.2f}x back to back; interleaved: a variational epoch = "
        f"{r['per_epoch']:.2f} plain ones, the stage {r['cost']:.2f}x)  [{r['stages']}]"
    )


def verdict(name: str, runs: dict[int, dict]) -> str:
    target = TARGETS.get(name, 0.0)
    size = all(r["ratio"] >= target and r["drop"] <= MAX_DROP for r in runs.values())
    cost = max(r["cost"] for r in runs.values())
    return (
        f"target {name}: >= {target:.0f}x within {MAX_DROP} point on every seed: {'MET' if size else 'MISSED'} "
        f"(lowest {min(r['ratio'] for r in runs.values()):.1f}x, worst drop "
        f"{max(r['drop'] for r in runs.values()):+.2f}); prune stage <= {MAX_COST:.0f}x plain fine-tuning: "
        f"{'MET' if cost <= MAX_COST else 'MISSED'} (worst {cost:.2f}x, interleaved)"
    )


if __name__ == "__main__":
    seeds_main(__doc__, TARGETS, one, line, verdict)
