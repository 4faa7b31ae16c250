"""format: gguf -> export/model.gguf, for llama.cpp: causal LMs of the Llama and GPT-2 families.

Written with the `gguf` package's GGUFWriter: tensor names from gguf.TensorNameMap, metadata and tokenizer
as llama.cpp's convert_hf_to_gguf.py writes them. The quantize stage's weights go in as Q8_0 or Q4_0 blocks
of 32 (`gguf_type`) built from its own levels where they fit the block (levels within the block's range, one
scale per 32 inputs: symmetric grids per tensor, per channel or in groups of a multiple of 32); the only
change is the block scale's rounding to float16, recorded per layer. Weights whose levels do not fit are
re-quantized by gguf.quants only with `requantize: true`, the extra error recorded per layer. Layers the
pipeline left in float (embeddings, norms, biases, a kept head) are written as F32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from lwpipe.deploy.gguf_vocab import write_vocab
from lwpipe.deploy.levels import hf_model, layer_grid, quant_steps, share_steps
from lwpipe.errors import ConfigError

ARCHS = {"llama": "LLAMA", "gpt2": "GPT2"}
BLOCK = 32
RANGE = {"q4_0": (-8, 7), "q8_0": (-128, 127)}


def check_order(cfg, before) -> str | None:
    if cfg.requantize:
        return None
    quant, lo_hi = quant_steps(before), RANGE[cfg.gguf_type]
    if not quant:
        return f"{cfg.gguf_type} blocks need the quantize stage's levels; add a quantize stage or set requantize=true"
    q = quant[-1].config
    if share_steps(before):
        return "a share stage's codebooks are not GGUF blocks; set requantize=true to re-quantize them"
    bits_max = 4 if cfg.gguf_type == "q4_0" else 8
    bits = [q.bits, *(lc.bits for lc in q.layers.values() if lc.bits is not None)]
    if q.scheme != "symmetric" or any(b == "auto" or b > bits_max for b in bits):
        return (
            f"gguf_type={cfg.gguf_type} holds symmetric levels {lo_hi[0]}..{lo_hi[1]}: stages.{quant[-1].name} has "
            f"scheme={q.scheme}, bits={q.bits}; quantize symmetric with bits<={bits_max} or set requantize=true"
        )
    if q.group_size is not None and q.group_size % BLOCK:
        return (
            f"gguf_type={cfg.gguf_type} has one scale per {BLOCK} weights: stages.{quant[-1].name}.group_size="
            f"{q.group_size} is not a multiple of {BLOCK}; use group_size=32 (or 64, 128, ...) or set requantize=true"
        )
    return None


def check_model(cfg, model: nn.Module, path: str) -> None:
    hf = hf_model(model, "gguf", path)
    kind = getattr(hf.config, "model_type", "?")
    if kind not in ARCHS or not hasattr(hf, "lm_head"):
        raise ConfigError(
            path, "gguf", f"writes causal LMs of the {sorted(ARCHS)} families; this model is {type(hf).__name__}"
        )


def blocks(levels: np.ndarray, scale: np.ndarray, gguf_type: str) -> np.ndarray:
    """GGML's block bytes of (out, in) levels with one float16 scale per block of 32 (ggml-common.h)."""
    rows, cols = levels.shape
    lv = levels.reshape(rows, cols // BLOCK, BLOCK).astype(np.int16)
    d = scale.reshape(rows, cols // BLOCK, BLOCK)[..., 0].astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if gguf_type == "q8_0":
        qs = lv.astype(np.int8).view(np.uint8)
    else:  # Q4_0: byte j holds element j (low nibble) and j+16 (high), each stored +8
        u = (lv + 8).astype(np.uint8)
        qs = u[..., :16] | (u[..., 16:] << 4)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def fits(levels: torch.Tensor, scale: torch.Tensor, info: dict, gguf_type: str) -> str | None:
    """Why these levels are not blocks of `gguf_type`, or None."""
    lo, hi = RANGE[gguf_type]
    if levels.shape[1] % BLOCK:
        return f"{levels.shape[1]} inputs are not whole blocks of {BLOCK}"
    if not info["symmetric"] or info["qmin"] < lo or info["qmax"] > hi:
        return f"levels {info['qmin']}..{info['qmax']} (symmetric={info['symmetric']}) are not within {lo}..{hi}"
    s = scale.reshape(scale.shape[0], -1, BLOCK)
    if not bool((s == s[..., :1]).all()):
        return f"scales change within a block of {BLOCK} (group {info['group']})"
    half = scale.half().float()
    if not bool(torch.isfinite(half).all()) or bool(((half - scale).abs() > scale.abs() * 2**-11).any()):
        return "block scales outside float16's normal range"
    return None


def tensor_form(name: str, layer: bool, grid, w: torch.Tensor, cfg) -> tuple[np.ndarray, object, dict, torch.Tensor]:
    """(data, raw dtype or None, export.json entry, the values the file must read back as) of one tensor
    already in GGUF's (out, in) layout; `layer`: a layer's weight matrix, `grid`: its layer_grid (or None)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, cfg.gguf_type.upper())
    if grid is not None:
        gw, levels, scale, info = grid
        why = fits(levels, scale, info, cfg.gguf_type)
        if why is None:
            data = blocks(levels.numpy(), scale.numpy(), cfg.gguf_type)
            written = levels * scale.half().float()
            return data, qtype, {"levels": "kept", "rel_error": rel(written, gw)}, written
        if not cfg.requantize:
            raise ConfigError("stages.export.requantize", False, f"{name}: {why}; set requantize=true")
    elif not layer or w.dim() != 2 or w.shape[1] % BLOCK or not cfg.requantize:
        return w.float().numpy(), None, {"levels": "float32"}, w.float()
    data = gguf.quants.quantize(w.float().numpy(), qtype)
    back = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(w.shape)
    return data, qtype, {"levels": "requantized", "rel_error": rel(back, w.float())}, back


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's rotary row order for Llama's q and k projections (rows only: blocks stay whole)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def module_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors one module computes with (constraints applied), by their plain names."""
    from torch.nn.utils import parametrize

    out = {n: p.detach() for n, p in m.named_parameters(recurse=False)}
    out |= {n: b.detach() for n, b in m.named_buffers(recurse=False) if b is not None}
    if parametrize.is_parametrized(m):
        out |= {n: getattr(m, n).detach() for n in m.parametrizations}
    return {n: t for n, t in out.items() if not n.startswith("parametrizations.")}


def weights(hf) -> Iterator[tuple[str, nn.Module | None, torch.Tensor]]:
    """(HF name, owning layer for weights, tensor in GGUF's layout) of every tensor llama.cpp reads, one at a
    time (a layer's constrained weight is computed when its turn comes, so the model is never copied whole)."""
    from transformers.pytorch_utils import Conv1D

    tied = hf.config.tie_word_embeddings
    for owner, m in hf.named_modules():
        if "parametrizations" in owner.split("."):  # a constraint's internals (original, mask, ...)
            continue
        for attr, t in module_tensors(m).items():
            name = f"{owner}.{attr}" if owner else attr
            if name.endswith((".attn.bias", ".attn.masked_bias")) or "inv_freq" in name or "." not in name:
                continue
            if tied and name.startswith("lm_head."):
                continue
            t = t.T if isinstance(m, Conv1D) and attr == "weight" else t
            yield name, m if attr == "weight" else None, t.detach().cpu().contiguous()


def planned(hf, cfg) -> Iterator[tuple[str, str, np.ndarray, object, dict, torch.Tensor]]:
    """(GGUF name, HF name, data, raw dtype or None, export.json entry, values it must read back as) of
    every tensor of the file, one at a time: what write() writes and what the run's check reads back."""
    import gguf

    c = hf.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHS[c.model_type]), c.num_hidden_layers)
    for name, m, w in weights(hf):
        grid = layer_grid(m) if m is not None else None
        if c.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            w = permute(w, heads)
            grid = None if grid is None else (*(permute(t, heads) for t in grid[:3]), grid[3])
        data, qtype, entry, intended = tensor_form(name, m is not None, grid, w, cfg)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError("stages.export.format", "gguf", f"no GGUF name for the tensor {name}")
        yield target, name, data, qtype, entry, intended


def write(model: nn.Module, ctx, cfg, out) -> dict:
    import gguf

    hf = model.eval()
    c = hf.config
    arch = getattr(gguf.MODEL_ARCH, ARCHS[c.model_type])
    path = out / "model.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    metadata(writer, c, cfg)
    vocab = write_vocab(writer, getattr(ctx.data, "tokenizer", None), c)
    layers, quantized = {}, 0
    for target, name, data, qtype, entry, intended in planned(hf, cfg):
        writer.add_tensor(target, data, raw_dtype=qtype)
        quantized += intended.numel() if qtype is not None else 0
        layers[target] = entry | {"hf_name": name, "type": qtype.name if qtype is not None else "F32"}
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "file": "export/model.gguf",
        "bytes": path.stat().st_size,
        "gguf_type": cfg.gguf_type,
        "quantized_weights": quantized,
        "layers": layers,
        "tokenizer": vocab,  # llama.cpp's vocabulary type; none: it runs the file on token ids only
    }


def metadata(writer, c, cfg) -> None:
    """The hyperparameters llama.cpp reads for the architecture, as convert_hf_to_gguf.py writes them."""
    import gguf

    ftype = gguf.LlamaFileType.MOSTLY_Q4_0 if cfg.gguf_type == "q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_name(getattr(c, "_name_or_path", "") or c.model_type)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_embedding_length(c.hidden_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_file_type(ftype)
    if c.model_type == "gpt2":
        writer.add_context_length(c.n_positions)
        writer.add_feed_forward_length(c.n_inner or 4 * c.hidden_size)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        return
    writer.add_context_length(c.max_position_embeddings)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
