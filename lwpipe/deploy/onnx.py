"""`format: onnx` -> export/model.onnx, run by ONNX Runtime with no lwpipe installed.

The compressed model, its constraints baked into plain weights, is traced (torch.onnx, dynamic batch and
sequence axes, a text model's attention mask an input); ORT's transformer optimizer fuses its layer norms
and GELUs where it recognises them; then each Linear on a symmetric grid of 8 bits or fewer runs ORT's int8
kernel on the pipeline's own levels and scales (lwpipe.deploy.onnx_graph), convolutions on such grids are
stored as int8 levels behind DequantizeLinear, and every other weight stays fp32 (the values the compressed
model computes with: exact). The file is then scored BY ONNX Runtime against the uncompressed reference and
timed at batch 1 and the measured batch next to PyTorch fp32.
"""

from __future__ import annotations

import fnmatch
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lwpipe import export, speed
from lwpipe.config import MeasureSettings
from lwpipe.errors import ConfigError
from lwpipe.tasks import head, model_inputs

log = logging.getLogger("lwpipe")
OPSET = 17
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_order(cfg, before) -> str | None:
    if cfg.activations == "static":
        return "activations=static is not written to ONNX; use activations=dynamic or auto"
    return None


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
    evaluation and timing; outputs as a dict (text models) or a tensor."""

    def __init__(self, path: Path, threads: int = 0):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        self.__dict__["session"] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, *args, **kwargs):
        feed = {k: v.cpu().numpy() for k, v in kwargs.items() if k in self.names}
        feed.update({k: v.cpu().numpy() for k, v in zip(self.names, args)})
        got = self.session.run(self.outputs, feed)
        outs = {k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.outputs, got)}
        return outs if self.outputs[0] != "output" else outs["output"]


def timings(model: nn.Module, form: nn.Module, ctx, settings) -> dict:
    """Median ms at batch 1 and the measured batch, the ONNX file and PyTorch fp32 (ctx.reference) alike."""
    run = speed.forward_fn(ctx)
    fp32 = ctx.reference if ctx.reference is not None else model
    out: dict = {"latency_ms": {}, "torch_fp32_latency_ms": {}, "speedup": {}}
    for n in speed.batch_sizes(settings, ctx):
        batch = speed.first_examples(ctx, n, torch.device("cpu"))
        args = (settings.repeats, settings.warmup, settings.max_seconds)
        ms = speed.median_ms(form, run, batch, *args)
        base = speed.median_ms(fp32.cpu(), run, batch, *args)
        out["latency_ms"][str(n)], out["torch_fp32_latency_ms"][str(n)] = round(ms, 3), round(base, 3)
        out["speedup"][str(n)] = round(base / ms, 3)
    return out


def build(model: nn.Module, example, path: Path, float_layers=(), smooth=None) -> dict:
    """Trace, optimise and quantize the compressed `model` into `path`; what was done, per layer.
    `smooth`: (alpha, calibration batches, forward(model, batch)) to smooth the int8 Linear layers' inputs."""
    import onnx

    from lwpipe.deploy.onnx_graph import quantize_graph
    from lwpipe.deploy.onnx_smooth import smooth as smooth_levels

    levels = layer_levels(model, float_layers)
    errors = smooth_levels(model, levels, *smooth) if smooth else None
    plain = export.plain_copy(model).cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            outputs = trace(plain, example, raw)
        except Exception as e:
            why = (str(e).strip().splitlines() or [""])[0]
            raise RuntimeError(f"format=onnx: the model does not trace to ONNX: {type(e).__name__}: {why}") from e
        fused = optimize(raw, plain)
        proto = onnx.load(str(raw))
    layers = quantize_graph(proto, levels)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    info = {"outputs": outputs, "opset": OPSET, "fusions": fused, "layers": layers}
    if errors is not None:  # the layers the file computes with (not a pooler no output reads)
        info["smooth_error"] = {k: v for k, v in errors.items() if layers.get(k) == "matmul_integer"}
    return info


def write(model: nn.Module, ctx, cfg, out: Path) -> dict:
    from lwpipe.stages.export import score

    model = model.cpu().eval()
    example = model_inputs(head(ctx.test_loader()[0], 2))
    path = Path(out) / "model.onnx"
    smooth = None
    if getattr(cfg, "smooth", None):
        batches = list(ctx.calibration_batches(cfg.calibration_batches))
        smooth = (cfg.smooth, batches, speed.forward_fn(ctx))
    info = {"file": f"export/{path.name}", **build(model, example, path, cfg.float_layers, smooth)}
    info["bytes"] = path.stat().st_size
    kinds = list(info["layers"].values())
    info["int8_layers"] = sum(k in ("matmul_integer", "dequantize_linear") for k in kinds)
    info["float_layers"] = sum(k == "float" for k in kinds)
    form = OrtModule(path)
    info.update(score(model, form, ctx))
    settings = getattr(ctx, "measure", None) or MeasureSettings()
    if settings.latency:
        info.update(timings(model, form, ctx, settings))
    return info
