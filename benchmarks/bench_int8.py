"""Latency of LeNet-300-100 in fp32 vs real int8 kernels, at batch 1 and 256, on this CPU.

    python benchmarks/bench_int8.py [--checkpoint run/checkpoints/05_distill.safetensors]

The int8 model comes from static post-training quantization with torch.ao's FX
path (observers calibrated on digits batches, then convert_fx): its Linear
layers run x86/fbgemm quantized::linear kernels on int8 weights and uint8
activations, so this is a real int8 path, not the fake-quantized (simulated)
forward the quantize stage trains with. torch 2.13 marks torch.ao's FX
quantization deprecated in favour of torchao's pt2e; its warnings are silenced
here. With a checkpoint, the compressed weights are baked in first (the int8
converter re-derives its own per-channel scales, so it is one more rounding).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from lwpipe import checkpoint
from lwpipe.data import load_digits
from lwpipe.export import bake, to_int8
from lwpipe.models import LeNet300


def latency_us(model, x, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--repeats", type=int, default=300)
    a = p.parse_args()
    data = load_digits()
    model = LeNet300(64).eval()
    if a.checkpoint:  # bake the constraints into plain weights: both paths then run plain modules
        model = bake(checkpoint.load_state(LeNet300(64), a.checkpoint), LeNet300(64))
    xs, ys = data.test.tensors
    q = to_int8(model, data.train.tensors[0][:512])
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc32 = (model(xs).argmax(1) == ys).float().mean().item()
        acc8 = (q(xs).argmax(1) == ys).float().mean().item()
        agree = (model(xs).argmax(1) == q(xs).argmax(1)).float().mean().item()
    print(
        f"threads={torch.get_num_threads()} accuracy fp32 {acc32:.4f} int8 {acc8:.4f} "
        f"agreement with the fp32 model it was made from {agree:.4f}"
    )
    for bs in (1, 256):
        x = xs[:bs] if bs <= len(xs) else xs.repeat(bs // len(xs) + 1, 1, 1, 1)[:bs]
        f, i = latency_us(model, x, a.repeats), latency_us(q, x, a.repeats)
        print(f"batch {bs:3d}: fp32 {f:9.1f} us  int8 {i:9.1f} us  speedup {f / i:.2f}x (median of {a.repeats})")


if __name__ == "__main__":
    main()
