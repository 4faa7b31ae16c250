"""Read a `.lwp` file back: `read` decodes every part (and measures what each costs), `build` fills a module.

The decoded layers carry the same `Compressed` constraint as the model that
was encoded (mask, codebook, grid), so the loaded model computes exactly the
same weights (integer levels become floats only through
constraints.dequantize, as in training) and can be encoded again to the same
bytes. Loading never runs code from the file: the model is built only by a
constructor on the allowlist (the classes lwpipe.models exports), unless the
caller passes its own module or trusted=True.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.artifact.coding import StreamReader
from lwpipe.artifact.format import ArtifactError, unpack
from lwpipe.artifact.positions import positions_from_gaps
from lwpipe.artifact.raw import DTYPES, RawReader, join_float, mantissa_bytes
from lwpipe.structured import resize_to
from lwpipe.constraints import COMPRESSIBLE, Compressed, dequantize, effective_tensors, set_half_bias


@dataclass
class Layer:
    name: str
    constraint: Compressed
    original: torch.Tensor
    cost: dict = field(default_factory=dict)  # bits: positions, values, other, total; nnz


@dataclass
class Artifact:
    header: dict
    layers: list[Layer]
    tensors: dict[str, tuple[torch.Tensor, bool]]  # name -> (value, held to fp16 by HalfBias)
    tensor_bits: dict[str, float]                   # name -> what storing it costs
    size: int

    @property
    def model_config(self) -> dict | None:
        return self.header.get("model")


def load(path, *, module: nn.Module | None = None, trusted: bool = False) -> nn.Module:
    """The model stored in a `.lwp` file, in eval mode, computing bit for bit what the encoded model computed.

    The model is built from the file's config only by an allowlisted constructor
    (lwpipe.models); pass `module` to fill a model you built, or `trusted=True`
    to let the file name any importable constructor (that runs code of its choosing).
    """
    data = read_bytes(path)
    header, _ = unpack(data, str(path))
    if module is None:
        constructor(header, trusted, str(path))  # refuse before any decoding work
    return build(read(data, str(path)), module=module, trusted=trusted, source=str(path))


def read_bytes(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None


def read(data: bytes, source: str = "artifact") -> Artifact:
    header, body = unpack(data, source)
    try:
        raw_len, bits_len, words_len = (int(n) for n in header["sections"])
        if raw_len + bits_len + words_len != len(body):
            raise ValueError(f"sections of {raw_len}+{bits_len}+{words_len} bytes in a body of {len(body)}")
        raw = RawReader(body[:raw_len])
        streams = StreamReader(body[raw_len:raw_len + bits_len], body[raw_len + bits_len:])
        layers = [read_layer(e, raw, streams) for e in header["layers"]]
        tensors, tensor_bits = {}, {}
        for name, how, shape, dtype, *flags in header["tensors"]:
            start, first = raw.pos, len(streams.stats)
            tensors[name] = (take(how, shape, DTYPES[dtype], raw, streams), "half" in flags)
            tensor_bits[name] = 8.0 * (raw.pos - start) + sum(_stream_bits(s) for s in streams.stats[first:])
        if raw.pos != raw_len or not streams.done():
            raise ValueError("data left over after the last tensor")
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise ArtifactError(f"{source} cannot be decoded: {e}") from None
    return Artifact(header, layers, tensors, tensor_bits, len(data))


def take(how: list, shape, restore: torch.dtype, raw: RawReader, streams: StreamReader) -> torch.Tensor:
    """The tensor `encode.put` stored as `how`."""
    if len(how) == 1:
        return raw.tensor(how[0], shape, restore)
    dtype, n = DTYPES[how[0]], math.prod(shape)
    symbols = streams.symbols(n)
    return join_float(symbols, int(how[1]), raw.take(mantissa_bytes(n, dtype)), dtype).reshape(shape).to(restore)


def read_layer(e: dict, raw: RawReader, streams: StreamReader) -> Layer:
    shape = [int(s) for s in e["shape"]]
    numel = math.prod(shape)
    c = Compressed(torch.Size(shape))
    bits0, raw0, first = streams.bits.pos, raw.pos, len(streams.stats)
    keep, cost = None, {"weights": numel, "nnz": numel, "positions": 0.0}
    if e.get("mask") is not None:
        m = e["mask"]
        keep = torch.from_numpy(positions_from_gaps(streams.symbols(m["gaps"]), m["escape"], m["nnz"], numel))
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[keep] = True
        c.set_mask(mask.view(shape))
        cost["nnz"], cost["positions"] = len(keep), _stream_bits(streams.stats[-1])
    n = cost["nnz"]

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(numel, dtype=values.dtype)
        full[keep if keep is not None else slice(None)] = values
        return full.view(shape)

    if e.get("quant") is not None:
        read_grid(c, e["quant"], raw, streams)
    dtype = DTYPES[e["dtype"]]
    original = torch.zeros(shape, dtype=dtype)
    if e.get("shared") is not None:
        k = int(e["shared"]["k"])
        index = torch.from_numpy(streams.symbols(n))
        if len(index) and int(index.max()) >= k:
            raise ValueError(f"layer {e['name']}: codebook index {int(index.max())} for a codebook of {k}")
        cost["values"] = _stream_bits(streams.stats[-1])
        if e["shared"]["codebook"] == "levels":
            width = (c.qmax - c.qmin).bit_length()
            levels = torch.tensor([streams.bits.read(width) + c.qmin for _ in range(k)], dtype=torch.float32)
            centroids = dequantize(levels, c.scale, c.zero_point)
        else:
            centroids = take(e["shared"]["codebook"], [k], torch.float32, raw, streams)
        c.set_codebook(scatter(index), centroids)
    elif c.quantized and "values" not in e:
        levels = torch.from_numpy(streams.symbols(n)) + c.qmin
        if len(levels) and int(levels.max()) > c.qmax:
            raise ValueError(f"layer {e['name']}: level {int(levels.max())} above qmax {c.qmax}")
        cost["values"] = _stream_bits(streams.stats[-1])
        weights = dequantize(scatter(levels.to(torch.float32)), c.scale, c.zero_point)
        original = (weights if c.mask is None else torch.where(c.mask, weights, torch.zeros(()))).to(dtype)
    else:
        start, coded = raw.pos, len(streams.stats)
        original = scatter(take(e["values"], [n], dtype, raw, streams))
        cost["values"] = 8.0 * (raw.pos - start) + sum(_stream_bits(s) for s in streams.stats[coded:])
    total = streams.bits.pos - bits0 + 8.0 * (raw.pos - raw0) + sum(s["coded_bits"] for s in streams.stats[first:])
    cost["total"] = total
    cost["other"] = total - cost["positions"] - cost["values"]
    return Layer(e["name"], c, original, cost)


def _stream_bits(stat: dict) -> float:
    return float(stat["table_bits"] + stat["coded_bits"])


def read_grid(c: Compressed, q: dict, raw: RawReader, streams: StreamReader) -> None:
    qmin, qmax = int(q["qmin"]), int(q["qmax"])
    scale = take(q["scale"][0], q["scale"][1], torch.float32, raw, streams)
    mode, shape = q["zp"]
    if isinstance(mode, int):
        zp = torch.full(shape, float(mode))
    elif mode == "levels":
        width = (qmax - qmin).bit_length()
        zp = torch.tensor([streams.bits.read(width) + qmin for _ in range(math.prod(shape))],
                          dtype=torch.float32).reshape(shape)
    else:
        zp = take(mode, shape, torch.float32, raw, streams)
    axis = q["axis"]
    if axis not in (None, 0):
        raise ValueError(f"quantization axis {axis!r} (this lwpipe knows None and 0)")
    c.set_quant(int(q["bits"]), qmin, qmax, scale, zp, axis)


# -- building the module -------------------------------------------------------------------
def allowed_constructors() -> dict[str, type]:
    import lwpipe.models as models

    out = {}
    for name in models.__all__:
        cls = getattr(models, name)
        out[f"lwpipe.models.{name}"] = out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return out


def constructor(header: dict, trusted: bool, source: str):
    """The class that builds the file's model; ArtifactError when it is not allowed."""
    config = header.get("model")
    if not isinstance(config, dict) or "_target_" not in config:
        raise ArtifactError(f"{source} holds no model config; pass module= with the model to fill")
    target = config["_target_"]
    if trusted:
        return None
    allowed = allowed_constructors()
    nested = any(isinstance(v, dict) and "_target_" in v for v in config.values())
    if target not in allowed or nested:
        what = f"model constructor {target!r}" + (" with nested _target_ values" if nested else "")
        raise ArtifactError(
            f"{source} asks for {what}, which is not on the allowlist "
            f"({', '.join(sorted(k for k in allowed if k.count('.') == 2))}); load it with module=<your model>, "
            f"or with trusted=True (lwpipe-inspect --trusted) if you trust the file's author: the file may then "
            f"run any importable code")
    return allowed[target]


def build_model(header: dict, trusted: bool, source: str) -> nn.Module:
    cls = constructor(header, trusted, source)
    config = header["model"]
    try:
        if cls is None:
            from hydra.utils import instantiate

            model = instantiate(config, _convert_="all")
        else:
            model = cls(**{k: v for k, v in config.items() if k != "_target_"})
    except Exception as e:
        raise ArtifactError(f"{source}: building the model {config['_target_']} failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"{source}: {config['_target_']} built a {type(model).__name__}, not an nn.Module")
    return model


@torch.no_grad()
def build(art: Artifact, module: nn.Module | None = None, trusted: bool = False, source: str = "artifact") -> nn.Module:
    model = module if module is not None else build_model(art.header, trusted, source)
    # a structurally pruned model has smaller layers than its config builds (lwpipe/structured.py)
    resize_to(model, {**{n: v.shape for n, (v, _) in art.tensors.items()},
                      **{layer.name: layer.original.shape for layer in art.layers}})
    stored = [layer.name for layer in art.layers] + list(art.tensors)
    have = set(effective_tensors(model))
    missing, unexpected = sorted(have - set(stored)), sorted(set(stored) - have)
    if missing or unexpected:
        raise ArtifactError(f"{source} does not fit the model {type(model).__name__}: "
                            f"tensors the model has but the file lacks {missing[:5]}, "
                            f"tensors in the file the model lacks {unexpected[:5]}")
    modules = dict(model.named_modules())
    for layer in art.layers:
        m = _owner(modules, layer.name, source)
        if not isinstance(m, COMPRESSIBLE):
            raise ArtifactError(f"{source}: {layer.name} is a compressed layer, the model's is a {type(m).__name__}")
        _release(m, "weight")
        _check_shape(m.weight, layer.original, layer.name, source)
        m.weight.copy_(layer.original)
        parametrize.register_parametrization(m, "weight", layer.constraint.to(m.weight.device), unsafe=True)
        if layer.constraint.shared:
            m.parametrizations.weight.original.requires_grad_(False)
    for name, (value, half) in art.tensors.items():
        m = _owner(modules, name, source)
        attr = name.rpartition(".")[2]
        _release(m, attr)
        _check_shape(getattr(m, attr), value, name, source)
        getattr(m, attr).copy_(value)
        if half:
            set_half_bias(m)
    return model.eval()


def _owner(modules: dict, name: str, source: str) -> nn.Module:
    owner = name.rpartition(".")[0]
    if owner not in modules:
        raise ArtifactError(f"{source}: the model has no module {owner!r} for {name}")
    return modules[owner]


def _release(m: nn.Module, attr: str) -> None:
    """Drop a constraint the target module already has: the file's own replaces it."""
    if parametrize.is_parametrized(m, attr):
        parametrize.remove_parametrizations(m, attr, leave_parametrized=False)


def _check_shape(have: torch.Tensor, stored: torch.Tensor, name: str, source: str) -> None:
    if tuple(have.shape) != tuple(stored.shape):
        raise ArtifactError(f"{source}: {name} is {list(stored.shape)} in the file but {list(have.shape)} in the model")
