"""Saving and loading a deployable form with torch alone: torch.export (.pt2) for plain float graphs,
TorchScript (.pt) where export cannot (int8 packed weights, sparse tensors). Text models are wrapped so that
their keyword inputs are named parameters and their output is a plain dict of tensors."""

from __future__ import annotations

import warnings

import torch
from torch import nn


class PlainOutput(nn.Module):
    """A text model called by its standard keyword inputs, whose output object becomes a plain dict of
    tensors: a saved form must load where transformers' output classes are not registered, and its
    parameters must be named (both torch.export and TorchScript map keyword inputs to them)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ):  # named: torch.export maps kwargs to parameters
        given = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, **{k: v for k, v in given.items() if v is not None})
        if isinstance(out, torch.Tensor) or not hasattr(out, "items"):
            return out
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def call_args(example) -> tuple[tuple, dict]:
    """(args, kwargs) of a forward on an example: a tensor, or a dict of keyword inputs (text models)."""
    return ((), dict(example)) if isinstance(example, dict) else ((example,), {})


def own_copy(example):
    """The example batch in storage of its own: a slice of the data set is a view, and torch.export saves
    the whole storage behind it with the program (a 70 K-parameter CNN's file held 2.46 MB of data)."""
    if isinstance(example, dict):
        return {k: v.clone() for k, v in example.items()}
    return example.clone()


def save_form(form: nn.Module, example, path) -> None:
    """torch.export (.pt2) for plain float graphs; TorchScript (.pt) where export cannot (int8 packed
    weights, sparse tensors). Either loads with torch alone: torch.export.load(p).module() / torch.jit.load(p).
    `example`: a tensor batch, or a dict of keyword inputs (input_ids, attention_mask...); its batch axis
    (and a text model's sequence axis) stays dynamic, so any batch size runs, not just the example's."""
    from pathlib import Path

    path = Path(path)
    args, kwargs = call_args(own_copy(example))
    auto = torch.export.Dim.AUTO
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if path.suffix == ".pt2":
            if kwargs:
                dyn = {k: {0: auto, 1: auto} if v.dim() > 1 else {0: auto} for k, v in kwargs.items()}
                ep = torch.export.export(PlainOutput(form), (), kwargs=kwargs, dynamic_shapes=dyn, strict=False)
            else:
                ep = torch.export.export(form, args, dynamic_shapes=({0: auto},))
            torch.export.save(ep, str(path))
        else:
            traced = torch.jit.trace(
                PlainOutput(form) if kwargs else form,
                args or None,
                example_kwarg_inputs=kwargs or None,
                check_trace=False,
                strict=False,
            )  # strict=False: transformers models return dicts
            torch.jit.save(traced, str(path))


def load_form(path) -> nn.Module:
    from pathlib import Path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if Path(path).suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path)).eval()
