"""Pickle-free model state files: safetensors, with the constraint layout in its metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lwpipe.constraints import apply_spec, model_spec
from lwpipe.errors import ConfigError
from lwpipe.lowrank import restore_factorized
from lwpipe.structured import resize_to


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_state(model: nn.Module, path: Path) -> None:
    """The whole model state, constraints included; `load_state` restores it into a fresh model.

    A tensor held under several names (tied weights, a constraint shared by tied layers) is saved
    once, the other names listed in the metadata: safetensors refuses shared tensors."""
    state, aliases, first, broadcast = {}, {}, {}, {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in first:
            aliases[k] = first[id(v)]
            continue
        first[id(v)] = k
        v = v.detach()
        if v.dim() and v.numel() > 1 and all(st == 0 for st in v.stride()):  # one value broadcast (a shared
            broadcast[k] = list(v.shape)  # layer's released original)
            v = v.reshape(-1)[:1]
        state[k] = v.contiguous().cpu()
    meta = {"lwpipe.constraints": json.dumps(model_spec(model))}
    if aliases:
        meta["lwpipe.aliases"] = json.dumps(aliases)
    if broadcast:
        meta["lwpipe.broadcast"] = json.dumps(broadcast)
    atomic_write(Path(path), lambda tmp: write_safetensors(state, Path(tmp), meta))


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory (safetensors' save_file first
    copies every tensor into bytes: a second model in memory); any other dtype: save_file."""
    if any(t.dtype not in SAFETENSORS_DTYPES for t in state.values()):
        save_file(state, str(path), metadata=metadata)
        return
    header, offset = {}, 0
    for name, t in state.items():
        size = t.numel() * t.element_size()
        dtype, shape = SAFETENSORS_DTYPES[t.dtype], list(t.shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as save_file writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for t in state.values():
            flat = t.reshape(-1)
            if flat.numel():
                if flat.stride(0) != 1:  # one value broadcast (stride 0): a size-1 tensor may have any stride
                    flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
                f.write(flat.view(torch.uint8).numpy().data)


def load_state(model: nn.Module, path: Path) -> nn.Module:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = {
            k.replace("parametrizations.", "").removesuffix(".original"): f.get_slice(k).get_shape() for k in f.keys()
        }
    restore_factorized(model, shapes)  # a factorized layer is two Linear layers (lwpipe/lowrank.py)
    resize_to(model, shapes)  # a structurally pruned model has smaller layers than a fresh one
    apply_spec(model, json.loads(meta.get("lwpipe.constraints", "{}")))
    state = load_file(str(path))
    for name, shape in json.loads(meta.get("lwpipe.broadcast", "{}")).items():
        state[name] = state[name].expand(shape)
    for alias, name in json.loads(meta.get("lwpipe.aliases", "{}")).items():
        state[alias] = state[name]
    model.load_state_dict(state, strict=True)
    return model


def load_weights(model: nn.Module, path: str, key: str = "model.checkpoint") -> nn.Module:
    """Plain weights from a user's file: .safetensors, or a torch file read with weights_only=True."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(key, path, "file does not exist")
    try:
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                if "lwpipe.constraints" in (f.metadata() or {}):
                    return load_state(model, p)
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except Exception as e:
        raise ConfigError(
            key, path, f"not a readable weights file (.safetensors, or a torch state dict): {e}"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(key, path, f"holds a {type(state).__name__}, expected a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        raise ConfigError(key, path, f"does not fit the model {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state)
    return model
