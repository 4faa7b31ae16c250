"""A run's self-check: the model.lwp it wrote loads (as a user loads it) to exactly the model it came from,
so a run never reports success with a file nothing can read.

The check streams: the file's config builds its model on the meta device (no memory), which must have exactly
the tensors the file stores, at their shapes; then each stored tensor is decoded, given the value the loaded
model computes with (its dtype, its constraint, float16 or 8-bit holding) and compared with the run's model,
one tensor at a time, so no second model is ever in memory. A model that cannot be built on the meta device
is loaded whole (lwpipe.load) and compared as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lwpipe.constraints import effective_tensors
from lwpipe.errors import LwpipeError
from lwpipe.held import GridBias, HalfBias
from lwpipe.schema import WeightForm


def verify_artifact(path: Path, model: nn.Module) -> None:
    """The written model.lwp loads (lwpipe.load, as a user loads it) to exactly the weights `model` computes
    with; LwpipeError otherwise, so a run never reports success with a file nothing can read."""
    from lwpipe.artifact import ArtifactError

    try:
        wrong = streamed_mismatch(Path(path), model)
    except ArtifactError as e:
        raise LwpipeError(f"the run's own {Path(path).name} does not load, so the run failed: {e}") from None
    if wrong:
        raise LwpipeError(
            f"the run's own {Path(path).name} decodes to other weights than the model it was written "
            f"from ({wrong}), so the run failed"
        )


@torch.no_grad()
def streamed_mismatch(path: Path, model: nn.Module) -> str | None:
    """artifact_mismatch of the file's model and `model`, decoding one tensor at a time (see the module's text)."""
    from lwpipe.artifact import load
    from lwpipe.artifact.decode import read_bytes
    from lwpipe.artifact.format import unpack

    source = str(path)
    data = read_bytes(path, mapped=True)  # mapped: the file's pages are held only while they are read
    header, body = unpack(data, source, view=True)
    skeleton = meta_model(header, source)
    if skeleton is None:  # not buildable without memory: the whole model, as a user loads it
        del data, body
        return artifact_mismatch(load(path, trusted=True), model)
    built = effective_tensors(skeleton)
    tied = header.get("tied") or {}
    modules = dict(model.named_modules())
    for name, value in decoded(header, body, built, source):
        for alias in [name] + [a for a, n in tied.items() if n == name]:
            wrong = tensor_mismatch(modules, alias, value)
            if wrong:
                return wrong
    return None


def meta_model(header: dict, source: str) -> nn.Module | None:
    """The file's model built on the meta device at the stored shapes and dtype (as lwpipe.load builds it),
    checked to hold exactly the tensors the file stores; None when it cannot be built there."""
    from lwpipe.artifact import ArtifactError
    from lwpipe.artifact.decode import _construct, check_tensors, stored_shapes
    from lwpipe.artifact.raw import DTYPES
    from lwpipe.lowrank import restore_factorized
    from lwpipe.structured import resize_to

    config = header.get("model")
    if not isinstance(config, dict) or "_target_" not in config:
        raise ArtifactError(f"{source} holds no model config; pass module= with the model to fill")
    try:
        with torch.device("meta"):
            model = _construct(None, config, source, torch.device("meta"))
            shapes = stored_shapes(header)
            restore_factorized(model, shapes)
            resize_to(model, shapes)
    except Exception:
        return None
    if not isinstance(model, nn.Module):
        return None
    dtypes = {DTYPES[e["dtype"]] for e in header["layers"]}
    if len(dtypes) == 1 and dtypes != {torch.float32}:  # decode's own rule: the model in its layers' dtype
        dtype = dtypes.pop()
        for p in model.parameters():
            p.data = p.data.to(dtype)
    stored = [e["name"] for e in header["layers"]] + [t[0] for t in header["tensors"]] + list(header.get("tied") or {})
    check_tensors(model, stored, source)
    return model


def decoded(header: dict, body, built: dict, source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, the value the loaded model computes with) for each stored tensor in file order, one at a time;
    ArtifactError as lwpipe.artifact.read gives it when the file cannot be decoded."""
    from lwpipe.artifact import ArtifactError
    from lwpipe.artifact.layer_read import read_layer, take, take_levels
    from lwpipe.artifact.raw import DTYPES

    try:
        raw, streams = readers(header, body)
        raw_len = header["sections"][0]
        for e in header["layers"]:
            layer = read_layer(e, raw, streams, WeightForm.from_header(e, header))
            fits(built[layer.name], layer.original, layer.name, source)
            original = layer.original if layer.constraint.shared else layer.original.to(built[layer.name].dtype)
            yield layer.name, layer.constraint(original)
        for name, how, shape, dtype, *flags in header["tensors"]:
            grid = None
            if how[0] == "levels":
                grid, value = take_levels(shape, raw, streams)
            else:
                value = take(how, shape, DTYPES[dtype], raw, streams)
            if "half" in flags and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} is held to float16 but holds NaN or Inf")
            fits(built[name], value, name, source)
            value = value.to(built[name].dtype)  # copied into the built model's tensor
            value = HalfBias()(value) if "half" in flags else value
            yield name, GridBias(grid)(value) if grid is not None else value
        if raw.pos != raw_len or not streams.done() or streams.bits.remaining >= 8:  # the writer pads < 1 byte
            raise ValueError("data left over after the last tensor")
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError) as e:
        raise ArtifactError(f"{source} cannot be decoded: {e}") from None


def readers(header: dict, body) -> tuple:
    """(RawReader, StreamReader) of a file's body, its header checked first (every declared count)."""
    from lwpipe.artifact.coding import StreamReader
    from lwpipe.artifact.format import drop_pages
    from lwpipe.artifact.limits import check_header
    from lwpipe.artifact.raw import RawReader

    check_header(header, len(body), None)
    raw_len, bits_len, _ = header["sections"]
    streams = StreamReader(body[raw_len : raw_len + bits_len], body[raw_len + bits_len :])
    drop_pages(body)  # a mapped file's ANS words are the coder's own copy now: their pages go
    return RawReader(body[:raw_len]), streams


def stored_layers(path: Path) -> Iterator:
    """The compressed layers of a .lwp file (layer_read.Layer: constraint, weights, cost in bits), read one at a
    time; the tensors after them are not decoded. ArtifactError when the file cannot be read."""
    from lwpipe.artifact import ArtifactError
    from lwpipe.artifact.decode import read_bytes
    from lwpipe.artifact.format import unpack
    from lwpipe.artifact.layer_read import read_layer

    data = read_bytes(path, mapped=True)
    header, body = unpack(data, str(path), view=True)
    try:
        raw, streams = readers(header, body)
        for e in header["layers"]:
            yield read_layer(e, raw, streams, WeightForm.from_header(e, header))
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError) as e:
        raise ArtifactError(f"{path} cannot be decoded: {e}") from None


def fits(have: torch.Tensor, stored: torch.Tensor, name: str, source: str) -> None:
    from lwpipe.artifact import ArtifactError

    if tuple(have.shape) != tuple(stored.shape):
        raise ArtifactError(f"{source}: {name} is {list(stored.shape)} in the file but {list(have.shape)} in the model")


@torch.no_grad()
def artifact_mismatch(loaded: nn.Module, model: nn.Module) -> str | None:
    """The first tensor of `loaded` that `model` (constraints applied) does not compute bit for bit; None."""
    modules = dict(model.named_modules())
    for name, got in effective_tensors(loaded).items():
        wrong = tensor_mismatch(modules, name, got)
        if wrong:
            return wrong
    return None


def tensor_mismatch(modules: dict, name: str, value: torch.Tensor) -> str | None:
    """Why the model's tensor `name` (its constraint applied) is not `value` bit for bit; None when it is."""
    owner, _, attr = name.rpartition(".")
    want = getattr(modules.get(owner), attr, None)
    if not isinstance(want, torch.Tensor):
        return f"{name}: the model has no such tensor"
    if not same_values(want.detach().cpu(), value):
        return f"{name} differs"
    return None


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values (NaN where the other has NaN; a float16-stored bias equals its float32 value)."""
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
