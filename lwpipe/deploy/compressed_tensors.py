"""format: compressed_tensors -> export/compressed_tensors/, for transformers and vLLM.

save_pretrained of the transformers model with its `quantization_config` in the layout the
`compressed-tensors` package defines, compressed by that package's own ModelCompressor: 4-bit levels as
pack-quantized (eight levels per int32), 8-bit as int-quantized, each layer's weight_scale the quantize stage's
own scales (per tensor, per channel, or per group), so the levels compressed-tensors rounds back are the
pipeline's. transformers.AutoModelForCausalLM.from_pretrained(DIR) decompresses them (compressed-tensors
installed). compressed-tensors 0.20 has no sparse compressor: a pruned model's zeros are stored as levels.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lwpipe.deploy.levels import hf_model, layer_grid, quant_steps, share_steps
from lwpipe.errors import ConfigError

log = logging.getLogger("lwpipe")
FORMATS = {4: "pack-quantized", 8: "int-quantized"}


def check_order(cfg, before) -> str | None:
    quant = quant_steps(before)
    if not quant:
        return "compressed_tensors stores the quantize stage's levels; add a quantize stage before export"
    if share_steps(before):
        return "compressed_tensors has no k-means codebooks (the share stage's); quantize without share"
    q, name = quant[-1].config, quant[-1].name
    bits = {q.bits, *(lc.bits for lc in q.layers.values() if lc.bits is not None)}
    if q.scheme != "symmetric":
        return f"compressed_tensors' int formats here hold symmetric grids: stages.{name}.scheme={q.scheme}"
    if len(bits) != 1 or not bits <= set(FORMATS):
        return f"compressed_tensors holds 4-bit or 8-bit levels, one width per model: stages.{name}.bits={q.bits}"
    return None


def check_model(cfg, model: nn.Module, path: str) -> None:
    from transformers.pytorch_utils import Conv1D

    hf = hf_model(model, "compressed_tensors", path)
    if any(isinstance(m, Conv1D) for m in hf.modules()):
        raise ConfigError(
            path,
            "compressed_tensors",
            f"{type(hf).__name__} keeps its layers in transformers' Conv1D, which compressed-tensors does not "
            "quantize (it targets Linear); use format=gguf or onnx for this model",
        )


def args_of(info: dict):
    from compressed_tensors.quantization import QuantizationArgs

    if info["per_tensor"]:
        strategy = {"strategy": "tensor"}
    elif info["group"] is not None:
        strategy = {"strategy": "group", "group_size": info["group"]}
    else:
        strategy = {"strategy": "channel"}
    return QuantizationArgs(num_bits=info["bits"], type="int", symmetric=True, **strategy)


def grids(model: nn.Module) -> dict[str, tuple]:
    """Linear layer -> (levels, scale in compressed-tensors' shape, info), checked against the format."""
    out = {}
    for name, m in model.named_modules():
        g = layer_grid(m) if isinstance(m, nn.Linear) else None
        if g is None:
            continue
        _, levels, scale, info = g
        lo, hi = -(1 << (info["bits"] - 1)), (1 << (info["bits"] - 1)) - 1
        if info["bits"] not in FORMATS or not info["symmetric"] or levels.min() < lo or levels.max() > hi:
            raise ConfigError("stages.export.format", "compressed_tensors", f"{name}: levels not int{info['bits']}")
        if info["per_tensor"]:
            scale = scale[:1, :1].reshape(1)
        elif info["group"] is not None:
            scale = scale[:, :: info["group"]]
        else:
            scale = scale[:, :1]
        out[name] = (levels, scale.contiguous(), info)
    return out


def write(model: nn.Module, ctx, cfg, out) -> dict:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    from lwpipe.export import plain_copy

    found = grids(model)
    plain = plain_copy(model).eval()
    groups, schemes = {}, {}
    for name, (_, _, info) in found.items():
        key = (info["bits"], info["group"], info["per_tensor"])
        schemes.setdefault(key, []).append(name)
    fmt = FORMATS[{k[0] for k in schemes}.pop()]  # check_order: one width per model
    for i, (_, names) in enumerate(sorted(schemes.items(), key=str)):
        args = args_of(found[names[0]][2])
        groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args, format=fmt)
    qconfig = QuantizationConfig(config_groups=groups, format=fmt, quantization_status="frozen")
    apply_quantization_config(plain, qconfig)
    mods = dict(plain.named_modules())
    with torch.no_grad():
        for name, (_, scale, _) in found.items():
            m = mods[name]
            m.weight_scale.data = scale.to(m.weight.dtype).reshape(m.weight_scale.shape).clone()
            m.weight_zero_point.data.zero_()
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(plain)
    target = out / "compressed_tensors"
    plain.save_pretrained(str(target))
    compressor.update_config(str(target))
    tok = getattr(ctx.data, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(str(target))
    files = sorted(p for p in target.rglob("*.safetensors"))
    return {
        "file": "export/compressed_tensors/",
        "bytes": sum(p.stat().st_size for p in target.rglob("*") if p.is_file()),
        "safetensors_bytes": sum(p.stat().st_size for p in files),
        "quantization_format": qconfig.format,
        "quantized_layers": len(found),
        "sparsity_config": None,  # compressed-tensors 0.20 has no sparse compressors
    }
