"""Which int8 activations cost all-MiniLM-L6-v2's cosine in lwpipe's ONNX file, and what would win it back.

The ONNX file's int8 Linear layers quantize their inputs per batch (DynamicQuantizeLinear: uint8, one scale and
zero point per tensor, the range including 0) and multiply exact int8 levels. This benchmark reproduces that
arithmetic in PyTorch (fake quantization, the same rounding), so variants that ONNX Runtime's fused kernel cannot
run are measured on the same footing, on the same 256 held-out texts as bench_deploy_onnx.py:

    weights only             the pipeline's levels (model.lwp), activations fp32
    all int8                 every encoder Linear's input quantized per tensor (what model.onnx runs)
    <type> fp32              one layer type's inputs left fp32 (q/k/v, attention output, FFN up, FFN down)
    per token                each token's own uint8 scale and zero point (not ORT's fused kernel)
    smooth a=<a> <types>     SmoothQuant (Xiao et al. 2023): inputs divided by s = max|X_j|^a / max|W_j|^(1-a)
                             (calibrated on 128 other texts), weights' input channels multiplied by s, then
                             re-rounded on each output channel's 8-bit range

    python benchmarks/bench_onnx_sensitivity.py [--scratch DIR] [--grid range step]

--scratch: bench_deploy_onnx.py's scratch directory; the run under it is made with --grid when absent.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deploy_onnx import GRIDS, lwpipe_run, minilm, sentence_model  # noqa: E402

TYPES = {
    "q/k/v": r"attention\.self\.",
    "attention output": r"attention\.output\.dense",
    "FFN up": r"intermediate\.dense",
    "FFN down": r"layer\.\d+\.output\.dense",
}


def per_tensor(x):  # DynamicQuantizeLinear, then back to float
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-12)
    zp = torch.round(-lo / s).clamp(0, 255)
    return (torch.clamp(torch.round(x / s) + zp, 0, 255) - zp) * s


def per_token(x):
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-12)
    zp = torch.round(-lo / s).clamp(0, 255)
    return (torch.clamp(torch.round(x / s) + zp, 0, 255) - zp) * s


def on_range(w):  # symmetric 8 bits, each output channel's own range
    s = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(w / s) * s


def encoder_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n]


@torch.inference_mode()
def input_max(model, batches) -> dict:
    """name -> max |x_j| of each input channel of every encoder Linear over the calibration batches."""
    stats, hooks = {}, []
    for n, m in encoder_linears(model):

        def hook(mod, args, n=n):
            a = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[n] = torch.maximum(stats[n], a) if n in stats else a

        hooks.append(m.register_forward_pre_hook(hook))
    for b in batches:
        model(**b)
    for h in hooks:
        h.remove()
    return stats


@torch.inference_mode()
def cosine(model, fp32, held, ref, quant=per_tensor, keep=(), smooth=(), alpha=0.5, amax=None) -> float:
    """Mean cosine to `ref` with the encoder Linears' inputs through `quant` (none for layers matching `keep`);
    layers matching `smooth` are smoothed from the fp32 weights and re-rounded on their range."""
    hooks, saved = [], {}
    fp32_w = dict(encoder_linears(fp32))
    for n, m in encoder_linears(model):
        s = None
        if any(re.search(k, n) for k in smooth):
            w = fp32_w[n].weight
            s = (amax[n].clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            saved[n] = m.weight.data
            m.weight.data = on_range(w * s)
        fq = None if quant is None or any(re.search(k, n) for k in keep) else quant

        def hook(mod, args, s=s, fq=fq):
            x = args[0] if s is None else args[0] / s
            return (x if fq is None else fq(x), *args[1:])

        hooks.append(m.register_forward_pre_hook(hook))
    got = torch.cat([model(**b) for b in held])
    for h in hooks:
        h.remove()
    for n, m in encoder_linears(model):
        m.weight.data = saved.get(n, m.weight.data)
    return F.cosine_similarity(got, ref, dim=-1).mean().item()


def variants(q, fp32, held, ref, amax) -> dict:
    out = {"weights only": cosine(q, fp32, held, ref, None), "all int8": cosine(q, fp32, held, ref)}
    for name, pattern in TYPES.items():
        out[f"{name} fp32"] = cosine(q, fp32, held, ref, keep=(pattern,))
    out["per token"] = cosine(q, fp32, held, ref, per_token)
    up = (TYPES["q/k/v"], TYPES["FFN up"])
    for alpha in (0.5, 0.7):
        out[f"smooth a={alpha} q/k/v, FFN up"] = cosine(q, fp32, held, ref, smooth=up, alpha=alpha, amax=amax)
    every = (*up, TYPES["attention output"], TYPES["FFN down"])
    out["smooth a=0.7 every Linear"] = cosine(q, fp32, held, ref, smooth=every, alpha=0.7, amax=amax)
    return out


def main():
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    import lwpipe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scratch", default="/tmp/bench_onnx")
    p.add_argument("--grid", nargs="+", choices=sorted(GRIDS), default=["range", "step"])
    a = p.parse_args()
    torch.set_num_threads(1)
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    path = minilm(scratch)
    fp32 = sentence_model(path).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = [line.strip() for t in topics.values() for line in t.split(".") if len(line.split()) >= 8]

    def batches(lines):
        return [
            dict(tok(lines[i : i + 64], truncation=True, max_length=64, padding=True, return_tensors="pt"))
            for i in range(0, len(lines), 64)
        ]

    held, calib = batches(texts[:256]), batches(texts[-128:])  # calibration texts: none of the held-out ones
    with torch.inference_mode():
        ref = torch.cat([fp32(**b) for b in held])
    amax = input_max(fp32, calib)
    results = {}
    for grid in a.grid:
        run = scratch / f"run_{grid}"
        if not (run / "model.lwp").exists():
            lwpipe_run(path, run, [], GRIDS[grid])
        results[grid] = variants(lwpipe.load(run / "model.lwp").eval(), fp32, held, ref, amax)
    print(f"| variant | {' | '.join(f'grid {g}' for g in a.grid)} |\n|---|{'---|' * len(a.grid)}")
    for name in results[a.grid[0]]:
        print(f"| {name} | {' | '.join(f'{results[g][name]:.4f}' for g in a.grid)} |")


if __name__ == "__main__":
    main()
