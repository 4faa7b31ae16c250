"""What the records' latency used to time and what it times now, interleaved in one process:
the input model, the parametrized training form (weights computed once per call batch, parametrize.cached)
and the baked plain copy (lwpipe.speed.timed_form), on a LeNet-300-100 run's last checkpoint.

    lwpipe recipe=deep_compression_lenet300 measure.threads=1
    python benchmarks/bench_timed_form.py RUN_DIR [--rounds 5] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from lwpipe import checkpoint
from lwpipe.export import plain_copy
from lwpipe.models import LeNet300
from lwpipe.speed import median_ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--in-features", type=int, default=64)  # 8x8 digits
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(1)
    last = sorted((a.run_dir / "checkpoints").glob("*.safetensors"))[-1]
    constrained = checkpoint.load_state(LeNet300(a.in_features, 10), last).eval()
    forms = {"input": LeNet300(a.in_features, 10).eval(), "parametrized": constrained, "baked": plain_copy(constrained)}
    for bs in (1, 256):
        x = torch.randn(bs, a.in_features)
        times = {k: [] for k in forms}
        for _ in range(a.rounds):  # interleaved: a busy machine slows every form alike
            for k, f in forms.items():
                times[k].append(median_ms(f, lambda m, b: m(b), x, a.repeats, 20, 5.0))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {bs}: " + ", ".join(f"{k} {v:.4f} ms ({med['input'] / v:.2f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
