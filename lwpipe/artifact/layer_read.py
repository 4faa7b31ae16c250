"""Reading one stored layer of a `.lwp` file: its mask positions, grid, codebook or levels, and what each
part costs in bits (lwpipe/artifact/decode.py reads the whole file)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lwpipe.artifact.coding import StreamReader
from lwpipe.artifact.positions import positions_from_gaps
from lwpipe.artifact.raw import DTYPES, FLOAT_FIELDS, RawReader, join_float, mantissa_bytes
from lwpipe.constraints import BIAS_LEVELS, Compressed, dequantize, index_dtype
from lwpipe.schema import WeightForm


@dataclass
class Layer:
    name: str
    constraint: Compressed
    original: torch.Tensor
    cost: dict = field(default_factory=dict)  # bits: positions, values, other, total; nnz
    form: WeightForm | None = None  # what the header declares (lwpipe/schema.py)


def take(how: list, shape, restore: torch.dtype, raw: RawReader, streams: StreamReader) -> torch.Tensor:
    """The tensor `encode.put` stored as `how`."""
    if len(how) == 1:
        return raw.tensor(how[0], shape, restore)
    dtype, n = DTYPES[how[0]], math.prod(shape)
    if mantissa_bytes(n, dtype) > raw.remaining:  # the mantissas are real bytes: they bound n before decoding
        raise ValueError(
            f"a tensor of {n:,} elements needs {mantissa_bytes(n, dtype):,} mantissa bytes, {raw.remaining:,} are left"
        )
    symbols = streams.symbols(n, 1 << (FLOAT_FIELDS[dtype][0] + 1), np.int16)  # sign + exponent: < 2^12
    return join_float(symbols, int(how[1]), raw.take(mantissa_bytes(n, dtype)), dtype).reshape(shape).to(restore)


def take_levels(shape, raw: RawReader, streams: StreamReader) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, scale x levels) of a tensor `encode.put_levels` stored as ["levels", 8]."""
    scale = raw.tensor("float32", [])
    if not bool(torch.isfinite(scale)) or float(scale) <= 0:
        raise ValueError(f"an 8-bit grid's scale is {float(scale)}, not a positive number")
    levels = torch.from_numpy(streams.symbols(math.prod(shape), 2 * BIAS_LEVELS + 1).astype("int64")) - BIAS_LEVELS
    return scale, (levels.float() * scale).reshape(shape)


def read_levels(streams: StreamReader, n: int, qmin: int, qmax: int) -> torch.Tensor:
    """n integer levels packed at the grid's bit width, as float32; the bits left bound n before reading."""
    width = (qmax - qmin).bit_length()
    if n * width > streams.bits.remaining:
        raise ValueError(f"{n:,} levels of {width} bits, {streams.bits.remaining:,} bits are left")
    return torch.from_numpy(streams.bits.read_many(n, width) + qmin).float()


def read_layer(e: dict, raw: RawReader, streams: StreamReader, form: WeightForm) -> Layer:
    """The layer entry `e` declaring `form` (WeightForm.from_header): its constraint and original weight."""
    shape = [int(s) for s in form.shape]
    numel = math.prod(shape)
    c = Compressed(torch.Size(shape))
    bits0, raw0, first = streams.bits.pos, raw.pos, len(streams.stats)
    keep, cost = None, {"weights": numel, "nnz": numel, "positions": 0.0}
    if form.mask:
        m = e["mask"]
        gaps = streams.symbols(m["gaps"], numel if m["escape"] is None else m["escape"] + 1)
        keep = torch.from_numpy(positions_from_gaps(gaps, m["escape"], m["nnz"], numel))
        del gaps
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[keep] = True
        c.set_mask(mask.view(shape))
        cost["nnz"], cost["positions"] = len(keep), _stream_bits(streams.stats[-1])
    n = cost["nnz"]

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(numel, dtype=values.dtype)
        full[keep if keep is not None else slice(None)] = values
        return full.view(shape)

    if form.grid is not None:
        read_grid(c, form, e["quant"], raw, streams)
    dtype = DTYPES[form.dtype]
    original = torch.zeros((), dtype=dtype).expand(shape)  # no memory: a shared layer computes from its codebook
    if form.codebook:
        k = form.codebook
        index = torch.from_numpy(streams.symbols(n, k)).to(index_dtype(k))
        cost["values"] = _stream_bits(streams.stats[-1])
        if e["shared"]["codebook"] == "levels":
            levels = read_levels(streams, k, c.qmin, c.qmax)
            centroids = dequantize(levels, c.scale, c.zero_point)
        else:
            centroids = take(e["shared"]["codebook"], [k], torch.float32, raw, streams)
        c.set_codebook(scatter(index), centroids)
    elif c.quantized and "values" not in e:
        levels = torch.from_numpy(streams.symbols(n, c.qmax - c.qmin + 1)) + c.qmin
        cost["values"] = _stream_bits(streams.stats[-1])
        weights = dequantize(scatter(levels.to(torch.float32)), *c.grid())
        original = (weights if c.mask is None else torch.where(c.mask, weights, torch.zeros(()))).to(dtype)
    else:
        start, coded = raw.pos, len(streams.stats)
        original = scatter(take(e["values"], [n], dtype, raw, streams))
        cost["values"] = 8.0 * (raw.pos - start) + sum(_stream_bits(s) for s in streams.stats[coded:])
    total = streams.bits.pos - bits0 + 8.0 * (raw.pos - raw0) + sum(s["coded_bits"] for s in streams.stats[first:])
    cost["total"] = total
    cost["other"] = total - cost["positions"] - cost["values"]
    return Layer(form.name, c, original, cost, form)


def _stream_bits(stat: dict) -> float:
    return float(stat["table_bits"] + stat["coded_bits"])


def read_grid(c: Compressed, form: WeightForm, q: dict, raw: RawReader, streams: StreamReader) -> None:
    """The layer's grid (limits.check_grid has checked the form: axis, group, shapes); its values are checked here."""
    grid, name = form.grid, form.name
    scale = take(q["scale"][0], q["scale"][1], torch.float32, raw, streams)
    mode, shape = q["zp"]
    if isinstance(mode, int):
        zp = torch.full(shape, float(mode))
    elif mode == "levels":
        zp = read_levels(streams, math.prod(shape), grid.qmin, grid.qmax).reshape(shape)
    else:
        zp = take(mode, shape, torch.float32, raw, streams)
    grid.check_values(scale, zp, name)
    c.set_quant(grid.bits, grid.qmin, grid.qmax, scale, zp, grid.axis, grid.group)
