"""`encode_model`: a compressed model -> the bytes of a `.lwp` file (container: format.py).

Each constrained layer stores only the parts it has, in this order:

    mask       kept positions as relative gaps (positions.py), entropy-coded
    quantized  scale (raw); zero point: one integer in the header, else packed levels, else raw
    shared     codebook index of each kept weight, entropy-coded; the codebook as integer
               levels at the grid's bit width when quantized per tensor, else raw floats
    quantized, not shared: the integer level of each kept weight, entropy-coded
    mask only  the kept values (also a grid whose levels are not integers: a fractional zero point)

A weight several modules compute with (tied: GPT-2's `lm_head.weight is
transformer.wte.weight`) is stored once; header["tied"] maps each other name to it.
Everything else (biases, norms, untouched layers, buffers) and every float part above
is stored exactly by `put`: at the narrowest dtype that holds it, its sign and
exponent entropy-coded when that is smaller (raw.py). Raw bytes go to the raw
section, tables and packed levels to the bit section, symbols to one ANS coder.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.artifact.coding import StreamWriter, estimate_bits
from lwpipe.artifact.format import FIRST_VERSION, MAGIC, VERSION, _deflate, _leb128
from lwpipe.artifact.positions import choose_escape
from lwpipe.artifact.raw import FLOAT_FIELDS, dtype_name, lossless_dtype, split_float, tensor_bytes
from lwpipe.artifact.raw import sign_exponent as raw_fields
from lwpipe.checkpoint import atomic_write
from lwpipe.constraints import (
    BIAS_LEVELS,
    Compressed,
    compressible_layers,
    constraint,
    grid_attrs,
    half_attrs,
    original_weight,
    parameter_shapes,
    tensor_aliases,
)
from lwpipe.errors import LwpipeError
from lwpipe.schema import FormError, WeightForm


def encode_model(model: nn.Module, model_config: dict | None, resized: bool = False) -> bytearray:
    """The `.lwp` bytes of `model`; `model_config` (the recipe's `model`, `checkpoint` dropped) rebuilds it;
    `resized`: structured pruning shrank its layers (lwpipe/structured.resized), so a loader may shrink the
    model `model_config` builds to the stored shapes."""
    return encode(model, model_config, resized)[0]


def write_encoded(model: nn.Module, model_config: dict | None, path, resized: bool = False) -> int:
    """encode_model(...) written to `path` (atomically: a reader never sees half a file), section by section:
    the file is never assembled in memory beside its sections (at 1.1 B parameters, 0.6 GB less at the peak).
    Returns the file's length."""
    header, sections, version, _ = encode_parts(model, model_config, bytearray(), resized)
    parts = frame_parts(header, sections, version)

    def write(tmp) -> None:
        with open(tmp, "wb") as f:
            crc = 0
            for part in parts:
                crc = zlib.crc32(part, crc)
                f.write(part)
            f.write(crc.to_bytes(4, "little"))

    atomic_write(path, write)
    return sum(len(p) for p in parts) + 4


def encoded_size(model: nn.Module, model_config: dict | None, resized: bool = False) -> int:
    """len(encode_model(model, model_config, resized)), without holding the file: its raw section is only counted."""
    header, (raw, bits, words), version, _ = encode_parts(model, model_config, RawCount(), resized)
    return frame(header, raw.n + len(bits) + words.nbytes, version)[1]


@torch.no_grad()
def encode(model: nn.Module, model_config: dict | None, resized: bool = False) -> tuple[bytearray, list[dict]]:
    """(file bytes, per-stream statistics: symbols, table bits, coded bits, entropy bits)."""
    header, sections, version, stats = encode_parts(model, model_config, bytearray(), resized)
    return assemble(header, sections, version), stats


@torch.no_grad()
def encode_parts(
    model: nn.Module, model_config: dict | None, raw, resized: bool = False
) -> tuple[dict, tuple, int, list[dict]]:
    """(header, (raw, bit section, ANS words), format version, stream statistics). Layer by layer: each
    layer's symbols are computed when it is written and again when the one ANS coder takes them (a stack,
    so in reverse), and are never queued whole; `raw` is a bytearray or a RawCount."""
    config = None if model_config is None else {k: v for k, v in dict(model_config).items() if k != "checkpoint"}
    streams = StreamWriter()
    layers, half, grids = [], set(), {}
    for name, m in compressible_layers(model):
        prefix = f"{name}." if name else ""
        c = constraint(m)
        if c is not None and (c.mask is not None or c.shared or c.quantized):
            layers.append(encode_layer(prefix + "weight", m, c, streams, raw))
    for mname, m in model.named_modules():
        half.update(f"{mname}.{a}" if mname else a for a in half_attrs(m))
        grids.update({f"{mname}.{a}" if mname else a: scale for a, scale in grid_attrs(m).items()})
    aliases = tensor_aliases(model)
    buffers = buffer_names(model)
    tensors = []
    for name, t in other_tensors(model, {e["name"] for e in layers} | set(aliases)):
        lazy, t = t.device.type == "cpu", t.cpu()  # the model's own tensor: its symbols computed twice
        how = put_levels(t, grids[name], streams, raw, name) if name in grids else put(t, streams, raw, name, lazy)
        flags = ["half"] * (name in half) + ["buffer"] * (name in buffers)
        tensors.append([name, how, list(t.shape), dtype_name(t.dtype)] + flags)
    bits, words = streams.finish_words()
    header = {
        "model": config,
        "dense_bytes": 4 * parameter_count(model),
        "layers": layers,
        "tensors": tensors,
        "sections": [len(raw), len(bits), words.nbytes],
    }
    if aliases:
        header["tied"] = aliases
    if resized:  # structurally pruned: layers smaller than the config builds
        header["resized"] = True
    grouped = any((e.get("quant") or {}).get("group") is not None for e in layers)
    return header, (raw, bits, words), VERSION if grouped else FIRST_VERSION, streams.stats


class RawCount:
    """A raw section that only counts its bytes (encoded_size)."""

    def __init__(self):
        self.n = 0

    def __iadd__(self, data) -> RawCount:
        self.n += len(data)
        return self

    def __len__(self) -> int:
        return self.n


def frame(header: dict, body_len: int, version: int) -> tuple[bytes, int]:
    """(the bytes before the body, the file's whole length), as format.pack lays them out."""
    head = _deflate(json.dumps(header, separators=(",", ":")).encode())
    rest = _leb128(len(head)) + head
    prefix = MAGIC + bytes([version])
    size = len(prefix) + len(rest) + body_len + 4
    while len(prefix) + len(_leb128(size)) + len(rest) + body_len + 4 != size:  # the length counts its own bytes
        size = len(prefix) + len(_leb128(size)) + len(rest) + body_len + 4
    return prefix + _leb128(size) + rest, size


def frame_parts(header: dict, sections: tuple, version: int) -> list:
    """The file's parts in order, all but its CRC: the frame, then the raw, bit and word sections (no copies)."""
    raw, bits, words = sections
    start, _ = frame(header, len(raw) + len(bits) + words.nbytes, version)
    return [start, memoryview(raw), memoryview(bits), memoryview(words).cast("B")]


def assemble(header: dict, sections: tuple, version: int) -> bytearray:
    """format.pack(header, raw + bits + words, version), written once into one buffer (no copies of the body)."""
    parts = frame_parts(header, sections, version)
    out = bytearray(sum(len(p) for p in parts) + 4)
    pos = 0
    for part in parts:
        out[pos : pos + len(part)] = part
        pos += len(part)
    out[pos:] = zlib.crc32(memoryview(out)[:pos]).to_bytes(4, "little")
    return out


def buffer_names(model: nn.Module) -> set[str]:
    """Plain names of the model's buffers (not parameters: `lwpipe-inspect` counts parameters)."""
    return {
        f"{mname}.{b}" if mname else b
        for mname, m in model.named_modules()
        if "parametrizations" not in mname.split(".")
        for b, t in m.named_buffers(recurse=False)
        if t is not None
    }


def other_tensors(model: nn.Module, skip: set[str]) -> list[tuple[str, torch.Tensor]]:
    """constraints.effective_tensors less `skip`, without computing the skipped weights; in module order,
    then by name, so that a parametrized tensor comes in the same place as a plain one."""
    out = []
    for mname, m in model.named_modules():
        if "parametrizations" in mname.split("."):
            continue
        names = [n for n, _ in m.named_parameters(recurse=False)]
        names += [n for n, b in m.named_buffers(recurse=False) if b is not None]
        names += list(m.parametrizations) if parametrize.is_parametrized(m) else []
        prefix = f"{mname}." if mname else ""
        out += [(prefix + n, getattr(m, n).detach()) for n in sorted(names) if prefix + n not in skip]
    return out


def put(t: torch.Tensor, streams: StreamWriter, raw: bytearray, label: str = "", lazy: bool = False) -> list:
    """Store t exactly; returns how: [stored dtype] for raw bytes, [stored dtype, lowest exponent] for split floats.
    `lazy`: t is the model's own tensor, kept alive by it: its symbols are computed again when coded, not queued."""
    t = t.detach().cpu()
    stored = lossless_dtype(t)
    lazy = lazy and stored == t.dtype  # a narrowed copy would be held instead
    t = t.to(stored)
    if stored in FLOAT_FIELDS and t.numel():
        symbols, low, mantissa = split_float(t)
        if estimate_bits(symbols) + 8 * len(mantissa) + 24 < 8 * t.numel() * t.element_size():
            again = (lambda: sign_exponent(t, low)) if lazy else None
            streams.symbols(symbols, f"{label} sign+exponent", again)
            del symbols
            raw += mantissa
            return [dtype_name(stored), low]
    raw += tensor_bytes(t)
    return [dtype_name(stored)]


def sign_exponent(t: torch.Tensor, low: int) -> np.ndarray:
    """split_float(t)'s symbols alone: 2 x (exponent - low) + sign, as uint16."""
    e_bits, m_bits, as_int = FLOAT_FIELDS[t.dtype]
    u = t.contiguous().reshape(-1).view(as_int).numpy().view(f"u{t.element_size()}")
    return raw_fields(u, e_bits, m_bits, low)[0]


def put_levels(t: torch.Tensor, scale: torch.Tensor, streams: StreamWriter, raw: bytearray, label: str = "") -> list:
    """A tensor held to scale x level (constraints.GridBias): the scale raw, the levels entropy-coded;
    ["levels", 8]. Falls back to `put` if t is not exactly on its grid (it always is through GridBias)."""
    scale = scale.detach().cpu().float()
    levels = torch.round(t.float() / scale)
    if t.dtype != torch.float32 or not torch.equal(levels * scale, t) or bool((levels.abs() > BIAS_LEVELS).any()):
        return put(t, streams, raw, label)
    raw += tensor_bytes(scale)
    streams.symbols(levels.reshape(-1).to(torch.int64).numpy() + BIAS_LEVELS, f"{label} levels")
    return ["levels", 8]


def parameter_count(model: nn.Module) -> int:
    """Parameters as the model computes with them (a parametrized weight counts once), as metrics.measure counts."""
    return sum(shape.numel() for shape in parameter_shapes(model).values())


def layer_form(name: str, module: nn.Module, c: Compressed) -> WeightForm:
    """The layer's compressed form (lwpipe/schema.py), checked: a form the reader would refuse is not written."""
    try:
        return WeightForm.of(name, module, c)
    except FormError as e:
        raise LwpipeError(str(e)) from None


def encode_layer(name: str, module: nn.Module, c: Compressed, streams: StreamWriter, raw: bytearray) -> dict:
    weight = original_weight(module).detach()
    form = layer_form(name, module, c)
    entry = {"name": form.name, "shape": list(form.shape), "dtype": form.dtype}
    lazy = weight.device.type == "cpu"  # symbols computed again from the model when coded, not queued
    keep = None
    if form.mask:
        keep = kept_positions(c, weight)
        escape, symbols = choose_escape(keep)
        again = (lambda: choose_escape(kept_positions(c, weight))[1]) if lazy else None
        streams.symbols(symbols, f"{name} positions", again)
        entry["mask"] = {"nnz": len(keep), "gaps": len(symbols), "escape": escape}
        del symbols

    def kept(t: torch.Tensor) -> np.ndarray:
        flat = t.detach().reshape(-1).cpu().numpy()
        return flat if keep is None else flat[keep]

    if form.grid is not None:
        entry["quant"] = encode_grid(c, form, streams, raw)
    if form.codebook:
        again = (lambda: kept_values(c, c.index, weight)) if lazy else None
        streams.symbols(kept(c.index), f"{name} codebook index", again)
        entry["shared"] = {"k": form.codebook}
        levels = grid_levels(c, c.centroids, name) if form.codebook_levels else None
        if levels is not None:  # the codebook at its quantized precision
            for level in levels.reshape(-1).tolist():
                streams.bits.write(level - form.grid.qmin, form.grid.width)
            entry["shared"]["codebook"] = "levels"
        else:
            entry["shared"]["codebook"] = put(c.centroids, streams, raw, f"{name} codebook")
        return entry
    levels = grid_levels(c, weight, name) if c.quantized else None
    if levels is not None:
        again = (lambda: kept_values(c, grid_levels(c, weight, name), weight) - c.qmin) if lazy else None
        streams.symbols(kept(levels) - c.qmin, f"{name} levels", again)
        del levels
    else:  # no grid, or one whose levels are not integers (a fractional zero point): the values themselves
        flat = weight.reshape(-1).cpu()  # in torch: numpy has no bf16
        entry["values"] = put(flat if keep is None else flat[torch.from_numpy(keep)], streams, raw, f"{name} values")
    return entry


def kept_positions(c: Compressed, weight: torch.Tensor) -> np.ndarray:
    """The flat positions the layer keeps (its mask, or its deferred zeros' complement: Compressed.kept)."""
    return np.flatnonzero(c.kept(weight).reshape(-1).cpu().numpy())  # ~4x torch.nonzero on CPU


def kept_values(c: Compressed, t: torch.Tensor, weight: torch.Tensor) -> np.ndarray:
    """t's entries at the positions the layer keeps (encode_layer's `kept`, computed afresh)."""
    flat, keep = t.detach().reshape(-1).cpu().numpy(), c.kept(weight)
    return flat if keep is None else flat[np.flatnonzero(keep.reshape(-1).cpu().numpy())]


def grid_levels(c: Compressed, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """The integer levels the layer's forward computes (Compressed.quant_levels); None if they are not integers."""
    q = c.quant_levels(x.detach()).cpu()
    if not bool(torch.isfinite(q).all()):
        raise LwpipeError(
            f"layer {name}: its quantization grid gives non-finite levels (a zero or non-finite "
            f"scale?); the artifact cannot store it"
        )
    return q.to(torch.int32) if bool((q == q.round()).all()) else None  # |levels| < 2^16


def encode_grid(c: Compressed, form: WeightForm, streams: StreamWriter, raw: bytearray) -> dict:
    """The layer's "quant" entry: the form's grid (lwpipe/schema.Grid.header), its scale and zero point stored."""
    grid, name = form.grid, form.name
    scale, zp = c.scale.detach().cpu(), c.zero_point.detach().cpu()
    scale_part = [put(scale, streams, raw, f"{name} scale"), list(scale.shape)]
    as_int = zp.to(torch.int64)
    exact = zp.dtype == torch.float32 and torch.equal(as_int.to(zp.dtype).view(torch.int32), zp.view(torch.int32))
    if exact and zp.numel() and bool((as_int == as_int.reshape(-1)[0]).all()):
        zp_part = [int(as_int.reshape(-1)[0]), list(zp.shape)]  # one integer for the whole layer
    elif exact and bool(((as_int >= grid.qmin) & (as_int <= grid.qmax)).all()):
        for level in as_int.reshape(-1).tolist():
            streams.bits.write(level - grid.qmin, grid.width)
        zp_part = ["levels", list(zp.shape)]
    else:
        zp_part = [put(zp, streams, raw, f"{name} zero point"), list(zp.shape)]
    return grid.header(scale_part, zp_part)


def size_metrics(size: int, dense_bytes: int) -> dict:
    """The metrics record's size fields: bytes of model.lwp, and the input model's dense bytes (in its own dtype,
    the record's dense_dtype) / those bytes."""
    return {"compressed_bytes": size, "compression_ratio": dense_bytes / size}
