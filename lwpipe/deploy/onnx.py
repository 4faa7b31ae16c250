"""`format: onnx` -> export/model.onnx, run by ONNX Runtime with no lwpipe installed.

The compressed model, its constraints baked into plain weights, is traced (torch.onnx, dynamic batch and
sequence axes, a text model's attention mask an input); ORT's transformer optimizer fuses its layer norms
and GELUs where it recognises them; then each Linear on a symmetric grid of 8 bits or fewer runs ORT's int8
kernel on the pipeline's own levels and scales (lwpipe.deploy.onnx_graph), each one with group-wise scales
(GPTQ's `group_size`) ORT's MatMulNBits (lwpipe.deploy.onnx_nbits), and every other weight, convolutions
included, stays fp32 (the values the compressed model computes with, BatchNorm folded in: exact). A convolution
is not stored as int8 levels behind a DequantizeLinear: ORT does not fold that node away and dequantizes the
weight on every call (1.7x slower convolutions on recipe=resnet_cifar_like's quantized ResNet). With
`activations: static` (opt-in: `auto` is the above), every convolution and Linear runs ORT's static int8
kernels instead, on activation scales calibrated on `calibration_batches` training batches and the pipeline's
levels where it has them (lwpipe.deploy.onnx_static). The file is then scored BY
ONNX Runtime against the uncompressed reference and timed at batch 1 and the measured batch next to PyTorch fp32.
"""

from __future__ import annotations

import fnmatch
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lwpipe import compute, export, speed
from lwpipe.config import MeasureSettings
from lwpipe.errors import ConfigError
from lwpipe.tasks import head, model_inputs

log = logging.getLogger("lwpipe")
OPSET = 17
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INT8_KINDS = ("matmul_integer", "int8_levels", "int8_rounded")  # export.json's layers


def check_order(cfg, before) -> str | None:
    if getattr(cfg, "reduce_range", False) and cfg.activations != "static":
        return (
            f"reduce_range=true narrows activations=static's int8 weights to 7 bits; activations={cfg.activations} "
            "writes none: set activations=static or drop reduce_range"
        )
    if cfg.activations == "static" and getattr(cfg, "smooth", None):
        return (
            f"smooth={cfg.smooth} smooths the inputs of activations=dynamic's int8 Linear layers; "
            "activations=static calibrates each layer's input scale instead: drop one of them"
        )
    return None


def check_inputs(cfg, batch, path: str) -> None:
    """Static activation scales are calibrated on tensor inputs (convolutional nets, MLPs), not text batches."""
    if cfg.activations == "static" and isinstance(batch, dict):
        raise ConfigError(
            f"{path}.activations",
            cfg.activations,
            "dynamic or auto for a text model with format=onnx (static int8 activation scales are written for "
            "models with one tensor input)",
        )


def check_model(cfg, model: nn.Module, path: str) -> None:
    """A scripted model cannot be traced, and each `float_layers` glob must name a layer the quantize stage
    can put on a grid; everything else is tried at export."""
    from lwpipe.constraints import compressible_layers

    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(path, "onnx", "a TorchScript module cannot be re-traced to ONNX; pass the nn.Module")
    names = [n for n, m in compressible_layers(model) if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    for i, glob in enumerate(getattr(cfg, "float_layers", None) or []):
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            key = f"{path.rpartition('.')[0] or path}.float_layers[{i}]"
            raise ConfigError(key, glob, f"format=onnx: matches no Linear or convolution layer; they are {shown}")


@torch.no_grad()
def layer_levels(model: nn.Module, float_layers=()) -> dict:
    """name -> (kind, effective weight, int8 levels, per-output-channel scales, out axis) for each layer on
    a symmetric grid of 8 bits or fewer without groups; the rest are written as their fp32 effective weight."""
    from lwpipe.constraints import compressible_layers, constraint, grid_axis

    out = {}
    for name, m in compressible_layers(model):
        c = constraint(m)
        if any(fnmatch.fnmatchcase(name, g) for g in float_layers):
            continue
        if c is None or not c.quantized or c.group is not None or c.qmin < -128 or c.qmax > 127:
            continue
        if bool((c.zero_point != 0).any()):
            continue
        kind = "linear" if isinstance(m, nn.Linear) else "conv" if isinstance(m, nn.modules.conv._ConvNd) else None
        if kind is None:
            continue
        w = m.weight.detach().float().cpu()
        scale = c.scale.float().cpu()
        levels = torch.round(w / scale)
        axis = grid_axis(m, True)
        scales = scale.reshape(-1).expand(w.shape[axis]).clone()
        out[name] = (kind, w.numpy(), levels.to(torch.int8).numpy(), scales.numpy(), axis)
    return out


def trace(plain: nn.Module, example, path: Path) -> list[str]:
    """torch.onnx (TorchScript tracer) with dynamic batch and sequence axes; returns the output names."""
    import warnings

    args, kwargs = export.call_args(export.own_copy(example))
    if kwargs:
        names = [k for k in TEXT_INPUTS if k in kwargs]
        form, args = export.PlainOutput(plain), tuple(kwargs[k] for k in names)
        with torch.no_grad():
            out = form(*args)
        outputs = list(out) if isinstance(out, dict) else ["output"]
        axes = {k: {0: "batch", 1: "sequence"} for k in names}
    else:
        form, names, outputs = plain, ["input"], ["output"]
        axes = {"input": {0: "batch"}}
    axes.update({o: {0: "batch"} for o in outputs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            form,
            args,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    return outputs


def optimize(path: Path, model: nn.Module) -> list[str]:
    """ORT's transformer optimizer on a BERT-family encoder (layer norm, GELU, skip-layer-norm fusion; the
    attention fusion is left out: it would merge Q, K and V into one float weight). Returns the fusions."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in ("bert", "roberta", "distilbert", "xlm-roberta", "electra"):
        return []
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("bert")
    opts.enable_attention = False
    opt = optimize_model(str(path), "bert", num_heads=0, hidden_size=0, optimization_options=opts, opt_level=0)
    opt.save_model_to_file(str(path))
    return sorted(k for k, v in opt.get_fused_operator_statistics().items() if v)


class OrtModule(nn.Module):
    """An ONNX Runtime session called as the model it was traced from (tensor or keyword inputs), for
    evaluation and timing; outputs as a dict (text models) or a tensor.

    A call's fixed cost is most of a small model's time (LeNet-300-100 at batch 1: about 15 us in all), so
    the input and output names and one RunOptions are kept, the tensors go to numpy and back as views (no
    copies), and the session's own C++ `run` is called: the public `InferenceSession.run` re-checks the feed's
    names and the outputs' ownership on every call (3 to 4 us), which this feed, built from the session's
    own input names, cannot fail. An input it lacks is still refused, by ORT's C++ side."""

    def __init__(self, path: Path, threads: int = 0):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.__dict__["session"] = session
        self.__dict__["options"] = ort.RunOptions()
        self.__dict__["call"] = getattr(session, "_sess", session).run  # the public run where ORT has no _sess
        self.names = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]
        self.single = self.outputs == ["output"]
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, *args, **kwargs):
        if kwargs:
            feed = {k: _array(v) for k, v in kwargs.items() if k in self.names}
            feed.update({k: _array(v) for k, v in zip(self.names, args)})
        else:
            feed = {k: _array(v) for k, v in zip(self.names, args)}
        got = self.call(self.outputs, feed, self.options)
        if self.single:
            return torch.from_numpy(got[0])
        return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.outputs, got)}


def _array(t: torch.Tensor) -> np.ndarray:
    """The tensor's numpy view (a copy only when it is not on the CPU or needs its gradient detached)."""
    return t.numpy() if t.is_cpu and not t.requires_grad else t.detach().cpu().numpy()


def timings(model: nn.Module, form: nn.Module, ctx, settings) -> dict:
    """Median ms at batch 1 and the measured batch, the ONNX file and PyTorch fp32 (ctx.reference) alike; a
    bf16 model's PyTorch time is taken in the arithmetic the run computes it in (float32 on a CPU)."""
    run = speed.forward_fn(ctx)
    fp32 = ctx.reference if ctx.reference is not None else model
    out: dict = {"latency_ms": {}, "torch_fp32_latency_ms": {}, "speedup": {}}
    for n in speed.batch_sizes(settings, ctx):
        batch = speed.first_examples(ctx, n, torch.device("cpu"))
        args = (settings.repeats, settings.warmup, settings.max_seconds)
        ms = speed.median_ms(form, run, batch, *args)
        with compute.upcast(ctx.compute):  # a bf16 model in the run's float32 arithmetic
            base = speed.median_ms(fp32.cpu(), run, batch, *args)
        out["latency_ms"][str(n)], out["torch_fp32_latency_ms"][str(n)] = round(ms, 3), round(base, 3)
        out["speedup"][str(n)] = round(base / ms, 3)
    return out


def to_float32(plain: nn.Module) -> str | None:
    """Make a bf16/fp16 plain copy float32 in place; returns the dtype it had (None: it was float32).

    ONNX Runtime's CPU kernels for these graphs (DynamicQuantizeLinear, MatMulInteger, the fused norms) take
    float32, and torch's ONNX tracer stops on a bf16 Llama ("ScalarType ComplexDouble is an unexpected tensor
    scalar type"): the file holds float32 where the model held bf16, the same values."""
    narrow = {t.dtype for t in [*plain.parameters(), *plain.buffers()] if t.dtype in (torch.bfloat16, torch.float16)}
    if not narrow:
        return None
    plain.float()
    return ",".join(sorted(str(d).removeprefix("torch.") for d in narrow))


def build(
    model: nn.Module, example, path: Path, float_layers=(), smooth=None, static=None, reduce_range: bool = False
) -> dict:
    """Trace, optimise and quantize the compressed `model` into `path`; what was done, per layer.
    `smooth`: (alpha, calibration batches, forward(model, batch)) to smooth the int8 Linear layers' inputs.
    `static`: calibration input tensors: every convolution and Linear runs ORT's static int8 kernels
    (lwpipe.deploy.onnx_static) instead of the dynamic MatMulInteger / fp32 convolutions, on 7-bit weights
    with `reduce_range`."""
    import onnx

    from lwpipe.deploy import onnx_store as store
    from lwpipe.deploy.onnx_graph import quantize_graph, share_transposed
    from lwpipe.deploy.onnx_nbits import group_levels, use_domain
    from lwpipe.deploy.onnx_smooth import smooth as smooth_levels
    from lwpipe.deploy.onnx_static import build_static, folded

    levels = layer_levels(model, () if static is not None else float_layers)
    errors = smooth_levels(model, levels, *smooth) if smooth else None
    # BatchNorm into the convolutions first: the traced weights are then the ones whose levels are known
    plain, levels = folded(model, levels)
    narrow = to_float32(plain)
    tied: list[str] = []
    data = None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            outputs = trace(plain, example, raw)
        except Exception as e:
            why = (str(e).strip().splitlines() or [""])[0]
            raise RuntimeError(f"format=onnx: the model does not trace to ONNX: {type(e).__name__}: {why}") from e
        fused = optimize(raw, plain)
        if static is not None:
            layers = build_static(plain, raw, path, levels, static, float_layers, reduce_range)
        else:
            plain = None  # the traced file holds the weights now: a large model's float32 copy goes
            grouped = group_levels(model, float_layers)
            # a traced file over 2 GB has its tensors beside it: they stay there, read one at a time
            proto = onnx.load(str(raw), load_external_data=False)
            layers = quantize_graph(proto, {**levels, **grouped}, raw.parent)
            del grouped
            if "matmul_nbits" in layers.values():
                use_domain(proto)
            tied = share_transposed(proto, raw.parent)  # a tied head's table once in the file
            data = store.save(proto, path, raw.parent)
    info = {"outputs": outputs, "opset": OPSET, "fusions": fused, "layers": layers}
    if data is not None:
        info["data_file"] = data.name
    if tied:
        info["tied_tables"] = tied  # held once, the head reading it through a Transpose
    if narrow:
        info["converted_from"] = narrow
    if static is not None:
        info["approximate"] = sorted(k for k, v in layers.items() if v == "int8_rounded")
    if errors is not None:  # the layers the file computes with (not a pooler no output reads)
        info["smooth_error"] = {k: v for k, v in errors.items() if layers.get(k) == "matmul_integer"}
    return info


def write(model: nn.Module, ctx, cfg, out: Path) -> dict:
    from lwpipe.stages.export import score

    model = model.cpu().eval()
    example = model_inputs(head(ctx.test_loader()[0], 2))
    path = Path(out) / "model.onnx"
    smooth = static = None
    if getattr(cfg, "smooth", None):
        batches = list(ctx.calibration_batches(cfg.calibration_batches))
        smooth = (cfg.smooth, batches, speed.forward_fn(ctx))
    if cfg.activations == "static":
        static = [model_inputs(b) for b in ctx.calibration_batches(cfg.calibration_batches)]
    info = {
        "file": f"export/{path.name}",
        **build(model, example, path, cfg.float_layers, smooth, static, cfg.reduce_range),
    }
    info["activations"] = "static" if static is not None else "dynamic"
    info["bytes"] = path.stat().st_size
    if "data_file" in info:  # over 2 GiB: the tensors beside the graph
        info["bytes"] += path.with_name(info["data_file"]).stat().st_size
        info["data_file"] = f"export/{info['data_file']}"
    kinds = list(info["layers"].values())
    info["int8_layers"] = sum(k in INT8_KINDS for k in kinds)
    info["nbits_layers"] = sum(k == "matmul_nbits" for k in kinds)
    info["float_layers"] = sum(k == "float" for k in kinds)
    form = OrtModule(path)
    info.update(score(model, form, ctx))
    settings = getattr(ctx, "measure", None) or MeasureSettings()
    if settings.latency:
        info.update(timings(model, form, ctx, settings))
    return info
