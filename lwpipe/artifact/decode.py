"""Read a `.lwp` file back: `read` decodes every part (and measures what each costs), `build` fills a module.

The decoded layers carry the same `Compressed` constraint as the model that
was encoded (mask, codebook, grid), so the loaded model computes exactly the
same weights (integer levels become floats only through
constraints.dequantize, as in training) and can be encoded again to the same
bytes. `load` then bakes them into plain weights unless asked for that
constrained, trainable form. Loading never runs code from the file: the model is built only by a
constructor on the allowlist (the classes lwpipe.models exports, and the
transformers rebuilders lwpipe.models.hf/sentence.from_config), unless the
caller passes its own module or trusted=True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.artifact.coding import StreamReader
from lwpipe.artifact.format import ArtifactError, read_file, unpack
from lwpipe.artifact.limits import HeaderError, check_arguments, check_grid_values, check_header
from lwpipe.artifact.positions import positions_from_gaps
from lwpipe.artifact.raw import DTYPES, FLOAT_FIELDS, RawReader, join_float, mantissa_bytes
from lwpipe.constraints import (
    BIAS_LEVELS,
    Compressed,
    constraint,
    dequantize,
    effective_tensors,
    ensure_constraint_as,
    grid_axis,
    index_dtype,
    is_compressible,
    set_grid,
    set_half,
)
from lwpipe.lowrank import restore_factorized
from lwpipe.structured import resize_to


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
    tensor_bits: dict[str, float]  # name -> what storing it costs
    size: int
    grids: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> scale of its 8-bit grid (GridBias)

    @property
    def model_config(self) -> dict | None:
        return self.header.get("model")


def load(
    path,
    *,
    module: nn.Module | None = None,
    trusted: bool = False,
    constrained: bool = False,
    max_dense_bytes: int | None = None,
) -> nn.Module:
    """The model stored in a `.lwp` file, in eval mode, computing bit for bit what the encoded model computed.

    By default a plain module: masks, codebooks and grids baked into ordinary weights
    (tied weights stay tied). `constrained=True` gives the trainable form instead: each
    layer carries its `Compressed` constraint, as after the run's last stage, and can be
    fine-tuned further or encoded again to the same bytes.

    The model is built from the file's config only by an allowlisted constructor
    (lwpipe.models); pass `module` to fill a model you built, or `trusted=True`
    to let the file name any importable constructor (that runs code of its choosing).
    A file is either loaded or refused with ArtifactError; reading it takes memory proportional to the
    model's dense size as the file declares it (`max_dense_bytes` refuses files that declare more).
    """
    data = read_bytes(path, max_dense_bytes)
    header, _ = unpack(data, str(path), view=True)
    if module is None:
        constructor(header, trusted, str(path))  # refuse before any decoding work
    try:
        model = build(read(data, str(path), max_dense_bytes), module=module, trusted=trusted, source=str(path))
        return model if constrained else bake_in_place(model)
    except MemoryError:
        raise ArtifactError(
            f"{path}: not enough memory to build the model it declares "
            f"({header.get('dense_bytes')} dense bytes); see max_dense_bytes"
        ) from None


def read_bytes(path, max_dense_bytes: int | None = None) -> bytes:
    """The file's bytes, read only when it is a regular file whose header passes `check_header` (and whose
    length is what that header can explain)."""

    def check(header: dict, body_len: int) -> None:
        try:
            check_header(header, body_len, max_dense_bytes)
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path} cannot be decoded: {e}") from None

    return read_file(path, check)


def read(data: bytes, source: str = "artifact", max_dense_bytes: int | None = None) -> Artifact:
    header, body = unpack(data, source, view=True)  # views: the body is not copied
    try:
        check_header(header, len(body), max_dense_bytes)  # every declared count, before anything is allocated
        raw_len, bits_len, words_len = header["sections"]
        raw = RawReader(body[:raw_len])
        streams = StreamReader(body[raw_len : raw_len + bits_len], body[raw_len + bits_len :])
        layers = [read_layer(e, raw, streams) for e in header["layers"]]
        tensors, tensor_bits, grids = {}, {}, {}
        for name, how, shape, dtype, *flags in header["tensors"]:
            start, first = raw.pos, len(streams.stats)
            if how[0] == "levels":
                grids[name], value = take_levels(shape, raw, streams)
            else:
                value = take(how, shape, DTYPES[dtype], raw, streams)
            if "half" in flags and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} is held to float16 but holds NaN or Inf")
            tensors[name] = (value, "half" in flags)
            tensor_bits[name] = 8.0 * (raw.pos - start) + sum(_stream_bits(s) for s in streams.stats[first:])
        if raw.pos != raw_len or not streams.done() or streams.bits.remaining >= 8:  # the writer pads < 1 byte
            raise ValueError("data left over after the last tensor")
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError) as e:
        raise ArtifactError(f"{source} cannot be decoded: {e}") from None
    except MemoryError:
        raise ArtifactError(
            f"{source} cannot be decoded: not enough memory for the {header.get('dense_bytes')} "
            "dense bytes it declares (max_dense_bytes refuses such files first)"
        ) from None
    return Artifact(header, layers, tensors, tensor_bits, len(data), grids)


def take(how: list, shape, restore: torch.dtype, raw: RawReader, streams: StreamReader) -> torch.Tensor:
    """The tensor `encode.put` stored as `how`."""
    if len(how) == 1:
        return raw.tensor(how[0], shape, restore)
    dtype, n = DTYPES[how[0]], math.prod(shape)
    if mantissa_bytes(n, dtype) > raw.remaining:  # the mantissas are real bytes: they bound n before decoding
        raise ValueError(
            f"a tensor of {n:,} elements needs {mantissa_bytes(n, dtype):,} mantissa bytes, {raw.remaining:,} are left"
        )
    symbols = streams.symbols(n, 1 << (FLOAT_FIELDS[dtype][0] + 1))
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


def read_layer(e: dict, raw: RawReader, streams: StreamReader) -> Layer:
    shape = [int(s) for s in e["shape"]]
    numel = math.prod(shape)
    c = Compressed(torch.Size(shape))
    bits0, raw0, first = streams.bits.pos, raw.pos, len(streams.stats)
    keep, cost = None, {"weights": numel, "nnz": numel, "positions": 0.0}
    if e.get("mask") is not None:
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

    if e.get("quant") is not None:
        read_grid(c, e["quant"], raw, streams, e["name"])
    dtype = DTYPES[e["dtype"]]
    original = torch.zeros((), dtype=dtype).expand(shape)  # no memory: a shared layer computes from its codebook
    if e.get("shared") is not None:
        k = int(e["shared"]["k"])
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
    return Layer(e["name"], c, original, cost)


def _stream_bits(stat: dict) -> float:
    return float(stat["table_bits"] + stat["coded_bits"])


def read_grid(c: Compressed, q: dict, raw: RawReader, streams: StreamReader, name: str) -> None:
    """The layer's grid (limits.check_grid has checked its axis and shapes); its values are checked here."""
    qmin, qmax = int(q["qmin"]), int(q["qmax"])
    scale = take(q["scale"][0], q["scale"][1], torch.float32, raw, streams)
    mode, shape = q["zp"]
    if isinstance(mode, int):
        zp = torch.full(shape, float(mode))
    elif mode == "levels":
        zp = read_levels(streams, math.prod(shape), qmin, qmax).reshape(shape)
    else:
        zp = take(mode, shape, torch.float32, raw, streams)
    check_grid_values(scale, zp, qmin, qmax, name)
    c.set_quant(int(q["bits"]), qmin, qmax, scale, zp, q["axis"], q.get("group"))  # shapes: limits.check_grid


# -- building the module -------------------------------------------------------------------
def allowed_constructors() -> dict[str, type]:
    import lwpipe.models as models
    from lwpipe.models import hf, sentence

    out = {}
    for name in models.__all__:
        cls = getattr(models, name)
        out[f"lwpipe.models.{name}"] = out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    # transformers models: built from the stored config, only classes transformers itself maps it to
    out["lwpipe.models.hf.from_config"] = hf.from_config
    out["lwpipe.models.sentence.from_config"] = sentence.from_config
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
    if not isinstance(target, str) or target not in allowed or nested:
        what = f"model constructor {target!r}" + (" with nested _target_ values" if nested else "")
        raise ArtifactError(
            f"{source} asks for {what}, which is not on the allowlist "
            f"({', '.join(sorted(k for k in allowed if k.count('.') == 2))}); load it with module=<your model>, "
            f"or with trusted=True (lwpipe-inspect --trusted) if you trust the file's author: the file may then "
            f"run any importable code"
        )
    return allowed[target]


def build_model(header: dict, trusted: bool, source: str) -> nn.Module:
    cls = constructor(header, trusted, source)
    config = header["model"]
    if cls is not None:  # the file's arguments are tried without memory first: they must give the file's shapes
        try:
            check_arguments(cls, config, header)  # before constructing even on meta: a million blocks take minutes
        except HeaderError as e:
            raise ArtifactError(f"{source}: the model's arguments do not fit the file: {e}") from None
        meta = _construct(cls, config, source, torch.device("meta"))
        stored = stored_shapes(header)
        built = {n: list(t.shape) for n, t in effective_tensors(meta).items()}
        if header.get("resized") is True and any(n in built and list(s) != built[n] for n, s in stored.items()):
            # a structurally pruned model has smaller layers (lwpipe/structured.py): shrink it while it holds no
            # memory, then give it memory at the stored shapes only (every tensor is then read from the file)
            with torch.device("meta"):
                resize_to(meta, stored)
            check_fit(meta, header, source)
            return meta.to_empty(device="cpu")
        check_fit(meta, header, source)
    model = _construct(cls, config, source)
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"{source}: {config['_target_']} built a {type(model).__name__}, not an nn.Module")
    return model


def _construct(cls, config: dict, source: str, device: torch.device | None = None):
    try:
        with torch.device(device or "cpu"):
            if cls is None:
                from hydra.utils import instantiate

                return instantiate(config, _convert_="all")
            return cls(**{k: v for k, v in config.items() if k != "_target_"})
    except Exception as e:  # MemoryError included
        raise ArtifactError(
            f"{source}: building the model {config['_target_']} failed: {str(e).strip() or type(e).__name__}"
        ) from None


def stored_shapes(header: dict) -> dict[str, list]:
    """Plain tensor name -> shape, of every tensor the file stores (layers and other tensors)."""
    return {e["name"]: e["shape"] for e in header["layers"]} | {t[0]: t[2] for t in header["tensors"]}


def check_fit(model: nn.Module, header: dict, source: str) -> None:
    """The model (built on the meta device) has exactly the tensors the file stores, at the stored shapes."""
    stored = stored_shapes(header)
    # a tied name (GPT-2's lm_head.weight) is stored once, under the tensor it shares: the model has both
    stored |= {a: stored[n] for a, n in (header.get("tied") or {}).items() if isinstance(a, str) and n in stored}
    restore_factorized(model, stored)  # a factorized layer is two Linear layers (lwpipe/lowrank.py)
    have = {name: list(t.shape) for name, t in effective_tensors(model).items()}
    if stored.keys() != have.keys():
        missing, unexpected = sorted(have.keys() - stored.keys()), sorted(stored.keys() - have.keys())
        raise ArtifactError(
            f"{source} does not fit the model {type(model).__name__}: "
            f"tensors the model has but the file lacks {missing[:5]}, "
            f"tensors in the file the model lacks {unexpected[:5]}"
        )
    for name, shape in stored.items():
        if list(shape) != have[name]:
            raise ArtifactError(f"{source}: {name} is {list(shape)} in the file but {have[name]} in the model")


@torch.no_grad()
def build(art: Artifact, module: nn.Module | None = None, trusted: bool = False, source: str = "artifact") -> nn.Module:
    """The constrained model: each stored layer carries its Compressed constraint (see bake_in_place)."""
    model = module if module is not None else build_model(art.header, trusted, source)
    dtypes = {layer.original.dtype for layer in art.layers}
    if module is None and len(dtypes) == 1 and dtypes != {torch.float32}:
        dtype = dtypes.pop()  # a bf16 / fp16 model computes in its own dtype, as it did when it was encoded
        for p in model.parameters():  # parameters only: buffers (rotary inv_freq) keep the dtype they are built in
            p.data = p.data.to(dtype)
    tied = art.header.get("tied") or {}
    restore_factorized(
        model,
        {
            **{n: v.shape for n, (v, _) in art.tensors.items()},
            **{layer.name: layer.original.shape for layer in art.layers},
        },
    )
    # a structurally pruned model has smaller layers than its config builds (lwpipe/structured.py)
    resize_to(
        model,
        {
            **{n: v.shape for n, (v, _) in art.tensors.items()},
            **{layer.name: layer.original.shape for layer in art.layers},
        },
    )
    stored = [layer.name for layer in art.layers] + list(art.tensors) + list(tied)
    have = set(effective_tensors(model))
    missing, unexpected = sorted(have - set(stored)), sorted(set(stored) - have)
    if missing or unexpected:
        raise ArtifactError(
            f"{source} does not fit the model {type(model).__name__}: "
            f"tensors the model has but the file lacks {missing[:5]}, "
            f"tensors in the file the model lacks {unexpected[:5]}"
        )
    modules = dict(model.named_modules())
    for alias, name in tied.items():  # one stored tensor, several modules: tie them as the encoded model was
        if name not in stored or name in tied:
            raise ArtifactError(f"{source}: {alias} is tied to {name!r}, which the file does not store")
        m, attr = _owner(modules, alias, source), alias.rpartition(".")[2]
        src, src_attr = _owner(modules, name, source), name.rpartition(".")[2]
        for mod, a in ((m, attr), (src, src_attr)):
            _release(mod, a)
        if getattr(m, attr) is not getattr(src, src_attr):
            _check_shape(getattr(m, attr), getattr(src, src_attr), alias, source)
            delattr(m, attr)
            setattr(m, attr, getattr(src, src_attr))
    for layer in art.layers:
        m = _owner(modules, layer.name, source)
        if not is_compressible(m):
            raise ArtifactError(f"{source}: {layer.name} is a compressed layer, the model's is a {type(m).__name__}")
        _release(m, "weight")
        _check_shape(m.weight, layer.original, layer.name, source)
        _check_grid_axis(m, layer, source)
        if layer.constraint.shared:  # computes from its codebook: no dense weight kept (release_original)
            m.weight.data = layer.original.to(m.weight.device)
        else:
            m.weight.copy_(layer.original)
        others = [(a, _owner(modules, a, source)) for a, n in tied.items() if n == layer.name]
        ensure_constraint_as(m, layer.constraint.to(m.weight.device), others)
        if layer.constraint.shared:
            m.parametrizations.weight.original.requires_grad_(False)
    for name, (value, half) in art.tensors.items():
        m = _owner(modules, name, source)
        attr = name.rpartition(".")[2]
        _release(m, attr)
        _check_shape(getattr(m, attr), value, name, source)
        getattr(m, attr).copy_(value)
        if half:
            set_half(m, attr)
        if name in art.grids:
            set_grid(m, attr, art.grids[name])
    for alias, name in tied.items():  # a tied tensor held to float16 is held so under every name
        if name in art.tensors and art.tensors[name][1]:
            set_half(_owner(modules, alias, source), alias.rpartition(".")[2])
        if name in art.grids:
            set_grid(_owner(modules, alias, source), alias.rpartition(".")[2], art.grids[name])
    return model.eval()


@torch.no_grad()
def bake_in_place(model: nn.Module) -> nn.Module:
    """Replace every parametrization by the ordinary tensor it computes (bit for bit the same values);
    modules tied to one constrained weight stay tied to the one baked Parameter."""
    owners: dict[int, nn.Module] = {}
    for m in list(model.modules()):
        c = constraint(m)
        if c is not None and owners.setdefault(id(c), m) is not m:  # a tied module: untie, re-tie below
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            for attr in list(m.parametrizations):
                parametrize.remove_parametrizations(m, attr, leave_parametrized=True)  # set_() on the original
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _owner(modules: dict, name: str, source: str) -> nn.Module:
    owner = name.rpartition(".")[0]
    if owner not in modules:
        raise ArtifactError(f"{source}: the model has no module {owner!r} for {name}")
    return modules[owner]


def _release(m: nn.Module, attr: str) -> None:
    """Drop a constraint the target module already has: the file's own replaces it."""
    if parametrize.is_parametrized(m, attr):
        parametrize.remove_parametrizations(m, attr, leave_parametrized=False)


def _check_grid_axis(m: nn.Module, layer: Layer, source: str) -> None:
    """A per-channel grid runs along the output axis of the layer type it fills (constraints.grid_axis)."""
    c = layer.constraint
    if c.quantized and c.axis is not None and c.axis != grid_axis(m, True):
        raise ArtifactError(
            f"{source}: {layer.name} has a grid along axis {c.axis}, but its layer, a "
            f"{type(m).__name__}, has its output channels on axis {grid_axis(m, True)}"
        )


def _check_shape(have: torch.Tensor, stored: torch.Tensor, name: str, source: str) -> None:
    if tuple(have.shape) != tuple(stored.shape):
        raise ArtifactError(f"{source}: {name} is {list(stored.shape)} in the file but {list(have.shape)} in the model")
