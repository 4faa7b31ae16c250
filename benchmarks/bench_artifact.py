"""The artifact's figures: coded bits against entropy, encode/decode speed, and a recipe's per-layer table.

    python benchmarks/bench_artifact.py                       # all three parts
    python benchmarks/bench_artifact.py --skip-recipe         # no training run (seconds instead of ~2 minutes)
    python benchmarks/bench_artifact.py --recipe deep_compression_lenet300 stages.share.bits=4 ...

1. Bits per symbol of each coded stream, against its empirical entropy and against
   what a Huffman code would spend (the reason the artifact uses ANS).
2. Encode and decode throughput in MB/s of dense float32 weights, on
   LeNet-300-100 with MNIST-sized inputs compressed the Deep Compression way.
3. The recipe run (on the default 8x8 digits), its accuracy against the
   trained baseline, and the lwpipe-inspect table of its model.lwp.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lwpipe.artifact import encode_model, read
from lwpipe.artifact.decode import build
from lwpipe.artifact.encode import encode
from lwpipe.artifact.inspect import format_table
from lwpipe.constraints import ensure_constraint, set_half_bias
from lwpipe.models import LeNet300


def huffman_bits(symbols: np.ndarray) -> int:
    """Bits a Huffman code built on the stream's own histogram spends on it (table not counted)."""
    counts = np.bincount(symbols)
    counts = counts[counts > 0]
    if len(counts) == 1:
        return len(symbols)  # a prefix code still spends one bit per symbol
    heap = [(int(c), i, [i]) for i, c in enumerate(counts)]
    depth = np.zeros(len(counts), dtype=np.int64)
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        depth[a[2] + b[2]] += 1
        heapq.heappush(heap, (a[0] + b[0], min(a[1], b[1]), a[2] + b[2]))
    return int((counts * depth).sum())


def stream_table(stats: list[dict], symbols: dict[str, np.ndarray] | None = None) -> str:
    head = (
        f"{'stream':34} {'symbols':>8} {'alph.':>5} {'entropy':>8} {'coded':>7} {'+table':>7} "
        f"{'over H':>7} {'over H+T':>8}" + (f" {'Huffman':>8}" if symbols else "")
    )
    lines = [head, " " * 44 + "bits per symbol" + (" " * 40 if symbols else "")]
    for s in stats:
        if s["n"] == 0:
            continue
        n, h = s["n"], s["entropy_bits"]
        over = 100 * (s["coded_bits"] - h) / h if h else 0.0
        over_t = 100 * (s["coded_bits"] - h) / (h + s["table_bits"]) if h else 0.0
        line = (
            f"{s['label'][:34]:34} {n:>8,} {s['alphabet']:>5} {h / n:>8.3f} {s['coded_bits'] / n:>7.3f} "
            f"{(s['coded_bits'] + s['table_bits']) / n:>7.3f} {over:>6.2f}% {over_t:>7.2f}%"
        )
        if symbols:
            line += f" {huffman_bits(symbols[s['label']]) / n:>8.3f}"
        lines.append(line)
    return "\n".join(lines)


def synthetic_streams() -> str:
    from lwpipe.artifact.coding import StreamWriter

    rng = np.random.default_rng(0)
    streams = {
        "gaps, 8% kept (geometric)": rng.geometric(0.08, 20_000) - 1,
        "mask bits, 5% kept": (rng.random(100_000) < 0.05).astype(np.int64),
        "one symbol at 95%": rng.choice(4, 50_000, p=[0.95, 0.03, 0.015, 0.005]),
        "index, 32 clusters (bell-shaped)": np.clip(np.rint(rng.normal(16, 5, 20_000)), 0, 31).astype(np.int64),
        "index, 64 clusters (Dirichlet)": rng.choice(64, 20_000, p=rng.dirichlet(np.ones(64))),
        "8-bit levels (Laplace)": np.clip(np.rint(rng.laplace(128, 12, 50_000)), 0, 255).astype(np.int64),
    }
    w = StreamWriter()
    for label, s in streams.items():
        w.symbols(s, label)
    w.finish()
    return stream_table(w.stats, streams)


@torch.no_grad()
def deep_compressed_lenet300(in_features: int = 784, keep=(0.08, 0.09, 0.26), bits: int = 5) -> LeNet300:
    """Magnitude pruning to the paper's densities, a linear-init codebook, the codebook on an 8-bit grid."""
    torch.manual_seed(0)
    m = LeNet300(in_features, 10).eval()
    for layer, k in zip((m.fc1, m.fc2, m.fc3), keep):
        w = layer.weight.detach()
        c = ensure_constraint(layer)
        c.set_mask(w.abs() >= w.abs().flatten().kthvalue(int((1 - k) * w.numel())).values)
        centroids = torch.linspace(w[c.mask].min().item(), w[c.mask].max().item(), 2**bits)
        c.set_codebook((w.unsqueeze(-1) - centroids).abs().argmin(-1), centroids)
        scale = centroids.abs().max() / 127
        c.set_quant(8, -127, 127, scale, torch.zeros(()), None)
        set_half_bias(layer)
    return m


def throughput(repeats: int) -> str:
    lines = [f"{'model':34} {'dense MB':>8} {'file KB':>8} {'ratio':>6} {'encode MB/s':>11} {'decode MB/s':>11}"]
    for in_features in (784, 64):
        m = deep_compressed_lenet300(in_features)
        cfg = {"_target_": "lwpipe.models.LeNet300", "in_features": in_features, "num_classes": 10}
        dense = 4 * sum(p.numel() for p in LeNet300(in_features, 10).parameters())
        blob = encode_model(m, cfg)
        enc, dec = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            encode_model(m, cfg)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            build(read(blob))
            dec.append(time.perf_counter() - t)
        mb = dense / 1e6
        lines.append(
            f"{f'LeNet-300-100, {in_features} inputs':34} {mb:>8.3f} "
            f"{len(blob) / 1e3:>8.2f} {dense / len(blob):>6.1f} {mb / statistics.median(enc):>11.1f} "
            f"{mb / statistics.median(dec):>11.1f}"
        )
    return "\n".join(lines)


def run_recipe(recipe: str, overrides: list[str], run_dir: Path) -> str:
    from hydra import compose, initialize_config_dir

    from lwpipe.cli import RECIPES
    from lwpipe.config import validate
    from lwpipe.runner import run

    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        fixed = [f"recipe={recipe}", "logger.console=null", "cache=false"]  # no stage cache left in outputs/
        cfg = compose(config_name="config", overrides=[*fixed, *overrides])
    t = time.perf_counter()
    final = run(validate(cfg), run_dir)
    seconds = time.perf_counter() - t
    records = [r for r in (read_records(run_dir)) if r["event"] == "stage_end"]
    trained = next((r for r in records if r["stage"] == "train"), records[0])
    art = read((run_dir / "model.lwp").read_bytes(), "model.lwp")
    _, stats = encode(build(art), art.model_config, art.header.get("resized") is True)
    return (
        f"lwpipe recipe={recipe} {' '.join(overrides)}   ({seconds:.0f} s, run dir {run_dir})\n"
        f"accuracy: trained {trained['accuracy']:.4f} -> final {final['accuracy']:.4f} "
        f"({100 * (final['accuracy'] - trained['accuracy']):+.2f} points); "
        f"model.lwp {final['compressed_bytes']:,} bytes, {final['compression_ratio']:.1f}x smaller than "
        f"dense float32 ({final['dense_bytes']:,} bytes)\n\n"
        + format_table(art)
        + "\n\nits coded streams:\n"
        + stream_table(stats)
    )


def read_records(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="deep_compression_lenet300")
    p.add_argument("--skip-recipe", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--run-dir", help="where the recipe's run goes (default: a temporary directory)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, as on the lwpipe command line")
    a = p.parse_args()
    print("1. coded streams against their empirical entropy (synthetic)\n")
    print(synthetic_streams())
    print(f"\n2. encode / decode throughput (torch threads: {torch.get_num_threads()}, median of {a.repeats})\n")
    print(throughput(a.repeats))
    if not a.skip_recipe:
        print(f"\n3. recipe {a.recipe} on the default data\n")
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(a.run_dir) if a.run_dir else Path(tmp)
            run_dir.mkdir(parents=True, exist_ok=True)
            print(run_recipe(a.recipe, a.overrides, run_dir))


if __name__ == "__main__":
    main()
