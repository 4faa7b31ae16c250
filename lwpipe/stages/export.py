"""Stage `export` (last in the pipeline): write the model's fast deployable form next to model.lwp.

    format: dense   constraints baked into plain weights, BatchNorm folded into the convolution before it;
                    torch.export -> export.pt2
    format: int8    real int8 kernels on the quantize stage's own integer levels (lwpipe.export.int8_form):
                    activations dynamic (per batch; Linear-heavy models) or static (calibrated; convolutions);
                    `auto` picks static when the model has convolutions. TorchScript -> export.pt
    format: sparse  CSR kernels for Linear layers at least `min_sparsity` sparse, dense for the rest;
                    TorchScript -> export.pt
    format: onnx    and the other runtimes' forms: lwpipe.deploy (onnx: `activations: static` runs ORT's static
                    int8 kernels on calibrated scales; `auto` and `dynamic` its dynamic int8 Linear)

The model passed on is unchanged (model.lwp still stores it); this stage's record times the exported
file (ctx.exported), so its `speedup` is against the fp32 input model, and holds the file's quality.
export.json holds the file's held-out quality and agreement, both against the uncompressed reference
(ctx.reference_outputs: the model before the first compression stage), and `agreement_with_model`,
how closely the file follows the compressed model it was made from.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lwpipe import compute, deploy, export, speed
from lwpipe.context import Context
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.settings import Strict
from lwpipe.stages import order
from lwpipe.stages.base import Stage
from lwpipe.stages.registry import register
from lwpipe.tasks import head, model_device, model_inputs, to_device

log = logging.getLogger("lwpipe")


TORCH_FORMATS = ("dense", "int8", "sparse")  # export.pt / export.pt2, run by PyTorch
Format = Literal["dense", "int8", "sparse", "onnx", "compressed_tensors", "gguf"]


class ExportConfig(Strict):
    format: Format | list[Format] = "dense"  # a list writes several forms from one run
    activations: Literal["auto", "dynamic", "static"] = "auto"  # int8; onnx: static = ORT's static int8 kernels
    min_sparsity: float = Field(0.8, ge=0, le=1)  # sparse only: the measured crossover (README)
    min_batch: int = Field(16, ge=1, le=1 << 20)  # sparse only: smaller batches run dense
    calibration_batches: int = Field(4, ge=1, le=10_000)  # static int8 activation ranges; onnx smooth: input maxima
    gguf_type: Literal["q8_0", "q4_0"] = "q8_0"  # gguf only: GGML's blocks of 32 weights, one fp16 scale each
    requantize: bool = False  # gguf only: re-quantize weights whose levels are not blocks (error recorded)
    float_layers: list[str] = []  # onnx only: layers (globs) written in fp32 though on an int8 grid
    smooth: float | None = Field(None, gt=0, lt=1)  # onnx only: SmoothQuant's alpha for the int8 Linear layers
    reduce_range: bool = False  # onnx static only: 7-bit weights (ORT's reduce_range), for x86 CPUs without VNNI


ONLY = {  # settings that only one form reads
    "min_sparsity": "sparse",
    "min_batch": "sparse",
    "gguf_type": "gguf",
    "requantize": "gguf",
    "float_layers": "onnx",
    "smooth": "onnx",
    "reduce_range": "onnx",
}


@register("export")
class Export(Stage):
    Config = ExportConfig
    leaves = ()
    trains = False
    needs_reference = False  # export.json compares with the reference's outputs (always kept), not the model
    last = True  # stages/order.py refuses it anywhere but last
    writes = ("export.pt", "export.pt2", "export.json")  # a run that takes it from the cache gets them too

    @staticmethod
    def times_reference(cfg: ExportConfig) -> bool:
        return "onnx" in Export.formats(cfg)  # export.json's torch_fp32_latency_ms: the uncompressed model's

    @staticmethod
    def replayable(cfg: ExportConfig) -> bool:
        """Deployable forms (export/) are written afresh by every run: the cache restores files, not folders."""
        return all(f in TORCH_FORMATS for f in Export.formats(cfg))

    @staticmethod
    def formats(cfg: ExportConfig) -> list[str]:
        return [cfg.format] if isinstance(cfg.format, str) else list(cfg.format)

    @staticmethod
    def check_order(cfg: ExportConfig, before) -> str | None:
        forms = Export.formats(cfg)
        if not forms or len(set(forms)) != len(forms):
            return f"format={forms}: name each form once (one of {list(Format.__args__)})"
        torch_forms = [f for f in forms if f in TORCH_FORMATS]
        if len(torch_forms) > 1:
            return f"format={forms}: at most one of {list(TORCH_FORMATS)} (each writes export.pt*) per run"
        for key in sorted(cfg.model_fields_set & set(ONLY)):  # set, and no form would read it
            if ONLY[key] not in forms:
                return (
                    f"{key}={getattr(cfg, key)} is set but format={cfg.format}: {key} is only used by "
                    f"format={ONLY[key]}; add {ONLY[key]} to format or drop {key}"
                )
        for fmt in set(forms) - set(TORCH_FORMATS):
            why = deploy.writer(fmt).check_order(cfg, before)
            if why:
                return f"format={fmt}: {why}"
        if "int8" not in forms:
            return None
        quant = order.leaving(before, "grid")
        if not quant:
            return (
                "format=int8 runs the quantize stage's integer levels; add a quantize stage before export "
                "(e.g. pipeline=[train,prune,quantize,export]) or use format=dense or sparse"
            )
        q = quant[-1].config
        layers = getattr(q, "layers", {}).values()
        bits = getattr(q, "bits", None)
        if (
            getattr(q, "scheme", None) != "symmetric"
            or not isinstance(bits, int)
            or bits > 8
            or any((lc.bits or 0) > 8 for lc in layers)
        ):
            return (
                f"format=int8 needs int8 levels: stages.{quant[-1].name} has scheme={getattr(q, 'scheme', None)}, "
                f"bits={bits}; "
                f"use scheme=symmetric and bits<=8"
            )
        return None

    def activations(self, model: nn.Module) -> str:
        if self.cfg.activations != "auto":
            return self.cfg.activations
        return "static" if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) else "dynamic"

    @staticmethod
    def check_context(cfg: ExportConfig, ctx: Context, path: str) -> None:
        """Before any stage runs: static int8 calibrates torch.ao FX on tensor inputs, not text batches."""
        forms = Export.formats(cfg)
        if "onnx" in forms:
            deploy.writer("onnx", f"{path}.format").check_inputs(cfg, ctx.test_loader()[0], path)
        if "int8" in forms and cfg.activations == "static" and isinstance(ctx.test_loader()[0], dict):
            raise ConfigError(
                f"{path}.activations",
                cfg.activations,
                "dynamic or auto for text models (static int8 calibrates tensor inputs through "
                "torch.ao FX, which does not trace transformers models)",
            )

    @staticmethod
    def check_model(cfg: ExportConfig, model: nn.Module, path: str) -> None:
        """Before any stage runs: each deployable format checks that this model can have it."""
        for fmt in Export.formats(cfg):
            if fmt not in TORCH_FORMATS:
                deploy.writer(fmt, f"{path}.format").check_model(cfg, model, f"{path}.format")

    def run(self, model: nn.Module, ctx: Context) -> nn.Module:
        forms = self.formats(self.cfg)
        info: dict = {"format": self.cfg.format}
        failed = None
        for fmt in forms:
            if fmt in TORCH_FORMATS:
                info.update(self.torch_form(model, ctx, fmt))
            else:
                out = ctx.run_dir / "export"
                out.mkdir(exist_ok=True)
                info[fmt] = deploy.writer(fmt).write(model, ctx, self.cfg, out)
                why = deploy_check(fmt, model, ctx, self.cfg, out, info[fmt])  # read back as its runtime reads it
                failed = failed or why
                log.info("  export %s -> export/: %s", fmt, {k: v for k, v in info[fmt].items() if k != "layers"})
        (ctx.run_dir / "export.json").write_text(json.dumps(info, indent=2))
        if failed:  # as model.lwp's self-check: no summary.json for a run whose outputs do not load as written
            raise LwpipeError(failed)
        return model

    def torch_form(self, model: nn.Module, ctx: Context, fmt: str) -> dict:
        """export.pt (int8, sparse) or export.pt2 (dense): written, loaded back, scored and timed."""
        model = model.cpu().eval() if fmt == "int8" else model.eval()  # int8 kernels are CPU ones
        batches = ctx.test_loader()
        device = model_device(model)
        example = model_inputs(to_device(head(batches[0], 2), device))  # a tensor, or a text model's kwargs
        info = {}
        if fmt == "int8":
            info["activations"] = self.activations(model)
            calib = None
            if info["activations"] == "static":
                calib = torch.cat([model_inputs(b) for b in ctx.calibration_batches(self.cfg.calibration_batches)])
            form, suffix = export.int8_form(model, calib, info["activations"]), ".pt"
        elif fmt == "sparse":
            form, info["sparse_layers"] = export.sparse_form(model, self.cfg.min_sparsity, self.cfg.min_batch)
            suffix = ".pt"
        else:
            form, suffix = export.dense_form(model), ".pt2"
        path = ctx.run_dir / f"export{suffix}"
        export.save_form(form, example, path)
        loaded = export.load_form(path)  # what a user gets: timed and scored, not the in-memory copy
        info.update(file=path.name, bytes=path.stat().st_size, **score(model, Deployed(loaded, device), ctx))
        log.info("  export %s -> %s: %s %.4f", fmt, path.name, info["metric"], info["quality"])
        log.info(
            "  agreement %.4f with the %s model, %.4f with the model exported",
            info["agreement"],
            info["reference"],
            info["agreement_with_model"],
        )
        ctx.exported = speed.Exported(model, loaded, f"{path.name} {fmt}")
        return info


def deploy_check(fmt: str, model: nn.Module, ctx: Context, cfg: ExportConfig, out, info: dict) -> str | None:
    """lwpipe.deploy.check (imported only for a deployable form): why the output does not load as written."""
    from lwpipe.deploy import check

    return check.run(fmt, model, ctx, cfg, out, info)


def score(model: nn.Module, deployed: nn.Module, ctx: Context) -> dict:
    """export.json's scores of the loaded file; the file's quality also goes into this stage's record
    (the model it was made from would only repeat the previous stage's)."""
    batches = ctx.test_loader()
    reference, against = ctx.reference_outputs, "uncompressed"
    if reference is None:  # called outside the runner, which keeps the reference's outputs
        with compute.upcast(ctx.compute):  # the model (not the file) in the run's arithmetic
            _, reference = ctx.task.evaluate(model, batches)
        against = "compressed"
    scored, outputs = ctx.task.evaluate(deployed, batches, reference)
    ctx.stage_record.update(scored, reference=against)
    with compute.upcast(ctx.compute):
        follows, _ = ctx.task.evaluate(model, batches, outputs)  # agreement is symmetric: the model vs the file
    return {
        "reference": against,
        "metric": scored["metric"],
        "quality": scored["quality"],
        "accuracy": scored["accuracy"],
        "agreement": scored["teacher_agreement"],
        "agreement_with_model": follows["teacher_agreement"],
    }


class Deployed(nn.Module):
    """A loaded export form as evaluation expects a module: it has a device, and train()/eval() leave it
    alone (a torch.export program has no training mode and refuses the switch)."""

    def __init__(self, form: nn.Module, device: torch.device):
        super().__init__()
        self.__dict__["form"] = form  # not a registered child: train() must not reach it
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def forward(self, *args, **kwargs):
        return self.form(*args, **kwargs)
