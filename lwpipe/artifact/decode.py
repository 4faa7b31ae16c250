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

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.artifact.coding import StreamReader
from lwpipe.artifact.format import ArtifactError, read_file, unpack
from lwpipe.artifact.layer_read import (  # noqa: F401  (re-exported)
    Layer,
    _stream_bits,
    read_grid,
    read_layer,
    read_levels,
    take,
    take_levels,
)
from lwpipe.artifact.limits import HeaderError, check_arguments, check_header
from lwpipe.artifact.raw import DTYPES, RawReader
from lwpipe.constraints import (
    constraint,
    effective_tensors,
    ensure_constraint_as,
    is_compressible,
    set_grid,
    set_half,
)
from lwpipe.lowrank import restore_factorized
from lwpipe.schema import FormError, WeightForm, layer_kind
from lwpipe.structured import resize_to


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


def read_bytes(path, max_dense_bytes: int | None = None, mapped: bool = False) -> bytes:
    """The file's bytes, read only when it is a regular file whose header passes `check_header` (and whose
    length is what that header can explain)."""

    def check(header: dict, body_len: int) -> None:
        try:
            check_header(header, body_len, max_dense_bytes)
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path} cannot be decoded: {e}") from None

    return read_file(path, check, mapped)


def read(data: bytes, source: str = "artifact", max_dense_bytes: int | None = None) -> Artifact:
    header, body = unpack(data, source, view=True)  # views: the body is not copied
    try:
        check_header(header, len(body), max_dense_bytes)  # every declared count, before anything is allocated
        raw_len, bits_len, words_len = header["sections"]
        raw = RawReader(body[:raw_len])
        streams = StreamReader(body[raw_len : raw_len + bits_len], body[raw_len + bits_len :])
        layers = [read_layer(e, raw, streams, WeightForm.from_header(e, header)) for e in header["layers"]]
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


def check_tensors(model: nn.Module, stored: list[str], source: str) -> None:
    """ArtifactError unless the file stores exactly the tensors the model has."""
    have = set(effective_tensors(model))
    missing, unexpected = sorted(have - set(stored)), sorted(set(stored) - have)
    if missing or unexpected:
        raise ArtifactError(
            f"{source} does not fit the model {type(model).__name__}: "
            f"tensors the model has but the file lacks {missing[:5]}, "
            f"tensors in the file the model lacks {unexpected[:5]}"
        )


@torch.no_grad()
def build(art: Artifact, module: nn.Module | None = None, trusted: bool = False, source: str = "artifact") -> nn.Module:
    """The constrained model: each stored layer carries its Compressed constraint (see bake_in_place)."""
    model = module if module is not None else build_model(art.header, trusted, source)
    _shape_as_stored(model, art, own_dtype=module is None)
    tied = art.header.get("tied") or {}
    stored = [layer.name for layer in art.layers] + list(art.tensors) + list(tied)
    check_tensors(model, stored, source)
    modules = dict(model.named_modules())
    _tie(modules, tied, stored, source)
    for layer in art.layers:
        _fill_layer(modules, layer, tied, source)
    _fill_tensors(modules, art, tied, source)
    return model.eval()


def _shape_as_stored(model: nn.Module, art: Artifact, own_dtype: bool) -> None:
    """The built model in the stored dtype (own_dtype: a model built here) and the stored shapes: factorized
    layers restored, a structurally pruned model's smaller layers."""
    dtypes = {layer.original.dtype for layer in art.layers}
    if own_dtype and len(dtypes) == 1 and dtypes != {torch.float32}:
        dtype = dtypes.pop()  # a bf16 / fp16 model computes in its own dtype, as it did when it was encoded
        for p in model.parameters():  # parameters only: buffers (rotary inv_freq) keep the dtype they are built in
            p.data = p.data.to(dtype)
    shapes = {
        **{n: v.shape for n, (v, _) in art.tensors.items()},
        **{layer.name: layer.original.shape for layer in art.layers},
    }
    restore_factorized(model, shapes)
    resize_to(model, shapes)  # a structurally pruned model has smaller layers than its config builds


def _tie(modules: dict, tied: dict, stored: list[str], source: str) -> None:
    """One stored tensor, several modules: tie them as the encoded model was."""
    for alias, name in tied.items():
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


def _fill_layer(modules: dict, layer: Layer, tied: dict, source: str) -> None:
    """A stored layer's weight and its Compressed constraint, on its module and the modules tied to it."""
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


def _fill_tensors(modules: dict, art: Artifact, tied: dict, source: str) -> None:
    """The other stored tensors, held to float16 or an 8-bit grid as they were (under every tied name too)."""
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
    """The stored form fits the layer it fills: a per-channel grid runs along the output axis of its kind."""
    try:
        layer.form.fits(layer_kind(m), type(m).__name__)
    except FormError as e:
        raise ArtifactError(f"{source}: {e}") from None


def _check_shape(have: torch.Tensor, stored: torch.Tensor, name: str, source: str) -> None:
    if tuple(have.shape) != tuple(stored.shape):
        raise ArtifactError(f"{source}: {name} is {list(stored.shape)} in the file but {list(have.shape)} in the model")
