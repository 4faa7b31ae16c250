"""What a run's verify-after-write step costs: loading its own model.lwp and comparing every tensor.

    python benchmarks/bench_verify.py [--threads 1]

Two models, each compressed in-process (no training, no download): LeNet-300-100 shared at 5 bits with
an 8-bit grid on the codebook, and a random BERT of all-MiniLM-L6-v2's shape (6 layers, width 384,
22.7 M parameters) on 8-bit per-channel grids. Prints the encode time and the best of `--repeats`
verification times (runner.verify_artifact: lwpipe.load on the written file, then a bitwise comparison).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lwpipe.artifact import encode_model
from lwpipe.constraints import compressible_layers, tied_layers
from lwpipe.runner import verify_artifact
from lwpipe.stages.quantize import quantize_layer
from lwpipe.stages.share import share_layer


def lenet():
    from lwpipe.models import LeNet300

    model = LeNet300()
    for _, layer in compressible_layers(model):
        share_layer(layer, 5)
        quantize_layer(layer, 8)
    return model, {"_target_": "lwpipe.models.LeNet300"}


def minilm_shaped():
    from transformers import BertConfig, BertModel

    from lwpipe.models.hf import rebuild_description

    cfg = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    model = BertModel(cfg).eval()
    ties = tied_layers(model)
    for name, layer in list(compressible_layers(model)):
        quantize_layer(layer, 8, "symmetric", True, ties.get(name, ()))
    return model, rebuild_description(model, "AutoModel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, build in [("LeNet-300-100", lenet), ("MiniLM-shaped BERT", minilm_shaped)]:
        torch.manual_seed(0)
        model, config = build()
        t = time.perf_counter()
        blob = encode_model(model, config)
        encode_s = time.perf_counter() - t
        path = Path(tempfile.mkdtemp()) / "model.lwp"
        path.write_bytes(blob)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            verify_artifact(path, model)
            times.append(time.perf_counter() - t)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"{name}: {params:.1f} M parameters, model.lwp {len(blob):,} B, encode {encode_s:.2f} s, "
            f"verify {min(times):.2f} s (best of {args.repeats}, {args.threads} thread)"
        )


if __name__ == "__main__":
    main()
