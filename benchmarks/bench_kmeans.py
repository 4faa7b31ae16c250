"""Time kmeans_1d on 10 M weights at 5 bits (32 centroids): the share stage's hot loop.

python benchmarks/bench_kmeans.py [--n 10000000] [--bits 5] [--init linear]
"""

from __future__ import annotations

import argparse
import time

import torch

from lwpipe.kmeans import kmeans_1d


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--bits", type=int, default=5)
    p.add_argument("--init", default="linear", choices=["linear", "density", "random", "kmeans++"])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    w = torch.randn(a.n, generator=torch.Generator().manual_seed(0)) * 0.05  # weight-like values
    kmeans_1d(w[:10_000], 1 << a.bits, a.init)  # warm-up
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        c, idx = kmeans_1d(w, 1 << a.bits, a.init)
        times.append(time.perf_counter() - t)
    err = (c[idx] - w).pow(2).mean().sqrt().item()
    print(
        f"kmeans_1d: n={a.n:,} bits={a.bits} init={a.init} threads={torch.get_num_threads()} "
        f"best {min(times):.3f} s, median {sorted(times)[len(times) // 2]:.3f} s, rms error {err:.2e}"
    )


if __name__ == "__main__":
    main()
