"""llm-compressor's side of bench_gptq.py, run with the Python of a venv that has llmcompressor.

    VENV/bin/python benchmarks/peer_llmcompressor.py MODEL_DIR calib.txt test.txt --max-length 64

Prints one JSON line: {"rtn": cosine, "gptq": cosine, "gptq_mse": cosine, "seconds": {...}}: mean cosine of the
mean-pooled, normalised embeddings (all-MiniLM-L6-v2's pooling) of the quantized BertModel to the
original's on test.txt, after llm-compressor's oneshot with QuantizationModifier (round to nearest)
or GPTQModifier, scheme W4A16 (4-bit symmetric weights, groups of 128) on every Linear layer,
calibrated on calib.txt; gptq_mse: the same with its MSE weight observer instead of min-max.
Kept apart from lwpipe's venv: llmcompressor pins its own packages.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def embed(model, batches) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out)


def one_layer(n: int) -> float:
    """Seconds for llm-compressor's quantize_weight on bench_gptq.one_layer's weight and Hessian (same seed and
    ops, so the same tensors): 4-bit symmetric, groups of 128, actorder static."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    torch.manual_seed(0)
    w = torch.randn(n, n) * 0.02
    x = torch.randn(n, n // 8).repeat_interleave(8, 1) + 0.1 * torch.randn(n, n)
    h = 2 * x.t() @ x / n
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=128, symmetric=True, actorder="static")
    scale = (w.view(n, -1, 128).abs().amax(2) / 7.5).clamp(min=1e-8)
    t = time.perf_counter()
    quantize_weight(w[None], h[None], scale[None], torch.zeros_like(scale)[None], None, args)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("calib", nargs="?")
    p.add_argument("test", nargs="?")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layer", type=int, help="only time one n x n layer")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.layer:
        print(json.dumps({"layer_seconds": one_layer(a.layer)}))
        return
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    lines = lambda f: [t for t in open(f, encoding="utf-8").read().splitlines() if t.strip()]  # noqa: E731
    calib, test = lines(a.calib), lines(a.test)
    enc = lambda texts: tok(texts, truncation=True, max_length=a.max_length, padding=True, return_tensors="pt")  # noqa: E731
    test_batches = [enc(test[i : i + 64]) for i in range(0, len(test), 64)]
    rows = [tok(t, truncation=True, max_length=a.max_length) for t in calib]
    ds = Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "attention_mask": [r["attention_mask"] for r in rows]}
    )
    original = AutoModel.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    reference = embed(original, test_batches)
    result, seconds = {}, {}
    mse = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 128,
                "observer": "mse",
            },
        }
    }
    for name, modifier in (
        ("rtn", QuantizationModifier(targets="Linear", scheme="W4A16", ignore=[])),
        ("gptq", GPTQModifier(targets="Linear", scheme="W4A16", ignore=[])),
        ("gptq_mse", GPTQModifier(config_groups=mse, ignore=[])),
    ):
        model = copy.deepcopy(original)
        t = time.perf_counter()
        oneshot(
            model=model, dataset=ds, recipe=modifier, max_seq_length=a.max_length, num_calibration_samples=len(calib)
        )
        seconds[name] = round(time.perf_counter() - t, 1)
        result[name] = torch.nn.functional.cosine_similarity(embed(model.eval(), test_batches), reference).mean().item()
    print(json.dumps({**result, "seconds": seconds, "test_texts": len(test), "calibration_texts": len(calib)}))


if __name__ == "__main__":
    main()
