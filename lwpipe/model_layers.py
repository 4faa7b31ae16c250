"""Helpers over a whole model: its compressible layers (each tied weight once), the tensors it computes
with by plain name, per-layer settings by name or glob, and a deep copy safe for parametrized modules."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.compressed import original_weight
from lwpipe.layout import is_compressible


def clone(model: nn.Module) -> nn.Module:
    """A deep copy whose parametrized modules have classes of their own.

    torch.nn.utils.parametrize gives each parametrized module a generated class and
    adds a property to it per parametrized tensor; copy.deepcopy shares that class, so
    parametrizing `bias` later on one copy would break the other (KeyError: 'bias').
    """
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return copied


def compressible_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Each compressible weight once: of modules sharing one weight (tied), the first in module order."""
    seen = set()
    for name, m in model.named_modules():
        if is_compressible(m) and id(original_weight(m)) not in seen:
            seen.add(id(original_weight(m)))
            yield name, m


def tied_layers(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Layer name (as compressible_layers gives it) -> the other modules computing with its weight."""
    owner, out = {}, {}
    for name, m in model.named_modules():
        if is_compressible(m):
            first = owner.setdefault(id(original_weight(m)), name)
            if first != name:
                out.setdefault(first, []).append((name, m))
    return out


@torch.no_grad()
def effective_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model computes with, by its plain state-dict name."""
    out: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in m.named_parameters(recurse=False):
            out[prefix + pname] = p.detach()
        for bname, b in m.named_buffers(recurse=False):
            if b is not None:
                out[prefix + bname] = b.detach()
        if parametrize.is_parametrized(m):
            for pname in m.parametrizations:
                out[prefix + pname] = getattr(m, pname).detach()
    # drop the parametrization internals (original, mask, index, centroids, ...)
    return {k: v for k, v in out.items() if "parametrizations." not in k}


def parameter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Plain name -> shape of each parameter the model computes with: a parametrized tensor counts
    once (as its `original`), a tied one once (under its first name), parametrization internals
    (centroids, masks) not at all."""
    return {name: t.shape for name, t in plain_parameters(model).items()}


def plain_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain name -> the stored parameter (a parametrized one's `original`), each tensor once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        if "parametrizations" in mname.split("."):
            continue
        prefix = f"{mname}." if mname else ""
        found = list(m.named_parameters(recurse=False))
        if parametrize.is_parametrized(m):
            found += [(pname, m.parametrizations[pname].original) for pname in m.parametrizations]
        for pname, p in found:
            if id(p) not in seen:
                seen.add(id(p))
                out[prefix + pname] = p
    return out


def tensor_aliases(model: nn.Module) -> dict[str, str]:
    """Plain name -> the first plain name of the same stored tensor, for tensors held under several names
    (tied weights)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for mname, m in model.named_modules():
        if "parametrizations" in mname.split("."):
            continue
        prefix = f"{mname}." if mname else ""
        found = list(m.named_parameters(recurse=False)) + [
            (n, b) for n, b in m.named_buffers(recurse=False) if b is not None
        ]
        if parametrize.is_parametrized(m):
            found += [(pname, m.parametrizations[pname].original) for pname in m.parametrizations]
        for pname, p in found:
            name = first.setdefault(id(p), prefix + pname)
            if name != prefix + pname:
                out[prefix + pname] = name
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def layer_setting(name: str, layers: Mapping[str, object], default=None, also=()):
    """Per-layer setting by exact module name, else the longest matching glob. `also`: other names of
    the same layer (modules tied to it), so that `lm_head` finds GPT-2's tied `transformer.wte`."""
    names = [name, *also]
    for n in names:
        if n in layers:
            return layers[n]
    hits = [p for p in layers if any(fnmatch.fnmatchcase(n, p) for n in names)]
    return layers[max(hits, key=len)] if hits else default


def unknown_layer_patterns(model: nn.Module, layers: Mapping[str, object]) -> list[str]:
    names = [n for n, m in model.named_modules() if is_compressible(m)]
    return [p for p in layers if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]


def check_layer_patterns(model: nn.Module, layers: Mapping[str, object], path: str) -> None:
    """A stage's `layers:` keys must each name or match a compressible layer."""
    bad = unknown_layer_patterns(model, layers)
    if bad:
        from lwpipe.errors import ConfigError

        names = [n for n, m in model.named_modules() if is_compressible(m)]
        names = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        raise ConfigError(f"{path}.layers", bad[0], f"matches no compressible layer; the layers are {names}")


def kept_kinds(model: nn.Module, kinds: list[str]) -> set[str]:
    """Names of the compressible layers `keep` leaves alone: Embedding tables, and the output head
    (transformers' get_output_embeddings(); tied to the token table in GPT-2, so one layer)."""
    head = model.get_output_embeddings() if "output_head" in kinds and hasattr(model, "get_output_embeddings") else None
    out = set()
    ties = tied_layers(model)
    for name, m in compressible_layers(model):
        group = [m] + [t for _, t in ties.get(name, ())]
        if ("embeddings" in kinds and isinstance(m, nn.Embedding)) or (
            head is not None and any(x is head for x in group)
        ):
            out.add(name)
    return out
