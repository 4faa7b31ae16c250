"""Issue-8 target: `lwpipe recipe=resnet_cifar_like` (ResNet, BatchNorm, residuals, 32x32 colour data)
ends >= 10x smaller (model.lwp bytes vs fp32) within 1 accuracy point of its trained baseline.

    python benchmarks/bench_resnet.py [--seeds 0] [extra lwpipe overrides...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    a, extra = p.parse_known_args()
    for seed in a.seeds:
        run_dir = Path(tempfile.mkdtemp(prefix="lwpipe-resnet-"))
        exe = shutil.which("lwpipe")
        cmd = ([exe] if exe else [sys.executable, "-m", "lwpipe.cli"]) + [
            "recipe=resnet_cifar_like",
            f"seed={seed}",
            "cache=false",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t
        s = json.loads((run_dir / "summary.json").read_text())
        trained = next(r for r in s["stages"] if r["stage"] == "train")
        for r in s["stages"]:
            print(
                f"  {r['stage']:9s} accuracy {r['accuracy']:.4f} sparsity {r['sparsity']:.3f} "
                f"{r['compressed_bytes']:8d} B  {r['compression_ratio']:6.2f}x"
            )
        f = s["final"]
        drop = 100 * (trained["accuracy"] - f["accuracy"])
        print(
            f"seed {seed}: trained {trained['accuracy']:.4f} -> final {f['accuracy']:.4f} "
            f"({drop:+.2f} points lost; target <= 1), model.lwp {f['compressed_bytes']} B of "
            f"{f['dense_bytes']} fp32 = {f['compression_ratio']:.1f}x (target >= 10), wall {wall:.0f} s"
        )
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
