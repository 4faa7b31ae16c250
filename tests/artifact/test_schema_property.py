"""Random compressed forms, written and read back: every one decodes to exactly the weights it was made of.

Each case draws, from its own seed, a layer type (Linear, Conv1d, Conv2d, Embedding, transformers' Conv1D,
GPT-2 with lm_head tied to the token table), a granularity (per tensor, per channel, per group of inputs) and a
chain of constraints (a mask, a k-means codebook, a grid of 1..8 bits under any scheme, ternary weights), puts
them on the layers through the stages' own functions, encodes the model and loads it into a freshly built
module with other weights: the tensors it computes with must be identical, bit for bit. Each goes through the
compressed-weight schema (lwpipe/schema.py): the form the writer builds from a layer's constraint is the form
the reader parses from the header, and it fits the layer kind it fills.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import lwpipe
from lwpipe.artifact import encode_model, read
from lwpipe.constraints import (
    compressible_layers,
    constraint,
    effective_tensors,
    ensure_constraint,
    grid_axis,
    original_weight,
    tied_layers,
)
from lwpipe.grid import binarize_layer, grouped_layer, quantize_layer
from lwpipe.masks import lowest_mask
from lwpipe.schema import WeightForm, layer_kind
from lwpipe.stages.share import share_layer
from tests.artifact.test_grid_schema import LAYERS

GRANULARITIES = ("per_tensor", "per_channel", "group")
SCHEMES = ("symmetric", "asymmetric", "symmetric_full")
PAIRS = [(k, g) for k in LAYERS for g in GRANULARITIES]
SEEDS = range(3 * len(PAIRS))  # each layer type x granularity three times, the rest of the form random


def draw(seed: int) -> tuple[str, dict]:
    """The layer type and one random compressed form (what each layer gets) of case `seed`."""
    rng = random.Random(seed)
    layer, granularity = PAIRS[seed % len(PAIRS)]
    kind = rng.choice(["grid", "grid", "binary", "ternary"]) if granularity != "group" else "grid"
    share = kind == "grid" and granularity == "per_tensor" and rng.random() < 0.4  # a codebook has one grid
    return layer, {
        "granularity": granularity,
        "mask": rng.choice([None, 0.3, 0.7]),
        "share_bits": rng.randint(1, 4) if share else None,
        "kind": kind,
        "bits": rng.randint(2, 8),
        "scheme": rng.choice(SCHEMES),
        "group": rng.choice([1, 2, 3, 4, 8]),
        "clip": rng.random() < 0.5,
    }


def apply_form(model: torch.nn.Module, form: dict) -> None:
    per_channel = form["granularity"] != "per_tensor"
    ties = tied_layers(model)
    for name, m in list(compressible_layers(model)):
        tied = ties.get(name, ())
        if form["mask"] is not None:  # as the prune stage applies a mask
            c = ensure_constraint(m, tied)
            c.set_mask(lowest_mask(m.weight.detach().abs(), form["mask"]))
            original_weight(m).data.mul_(c.mask)
        if form["share_bits"] is not None:
            share_layer(m, form["share_bits"], tied=tied)
        if form["kind"] == "grid":
            group = form["group"] if form["granularity"] == "group" else None
            clip = group is not None and form["clip"] and form["scheme"] == "symmetric"
            quantize_layer(m, form["bits"], form["scheme"], per_channel, tied, group=group, clip=clip)
        else:
            binarize_layer(m, per_channel, ternary=form["kind"] == "ternary", tied=tied)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_compressed_form_decodes_to_identical_weights(seed, tmp_path):
    kind, form = draw(seed)
    torch.manual_seed(seed)
    model = LAYERS[kind]()
    apply_form(model, form)
    want = {k: v.clone() for k, v in effective_tensors(model).items()}

    blob = encode_model(model, None)
    art = read(blob)
    stored = {e["name"]: e for e in art.header["layers"]}
    read_forms = {layer.name: layer.form for layer in art.layers}
    ties = tied_layers(model)
    for name, m in compressible_layers(model):
        c, q = constraint(m), stored[f"{name}.weight"]["quant"]
        assert q["axis"] == c.axis == grid_axis(m, form["granularity"] != "per_tensor" and not c.shared), form
        grouped = form["granularity"] == "group" and form["kind"] == "grid" and grouped_layer(m)
        assert q.get("group") == c.group == (form["group"] if grouped else None), form
        written = WeightForm.of(f"{name}.weight", m, c, tied=[f"{t}.weight" for t, _ in ties.get(name, ())])
        got = read_forms[f"{name}.weight"]
        assert got == dataclasses.replace(written, kind=None), (written, got)  # encode -> form -> header -> form
        got.fits(layer_kind(m))
        assert written.grid.scale_shape(written.shape) == tuple(c.scale.shape)
    (tmp_path / "model.lwp").write_bytes(blob)
    torch.manual_seed(seed + 1000)  # the fresh module's own weights differ: every value below comes from the file
    loaded = lwpipe.load(tmp_path / "model.lwp", module=LAYERS[kind]())
    got = effective_tensors(loaded)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), (kind, form, name)
    if kind == "tied":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_the_draws_cover_every_layer_type_and_granularity():
    """The seeds reach each layer type with each granularity, and every chain element, at least once."""
    seen, parts = set(), set()
    for seed in SEEDS:
        kind, form = draw(seed)
        seen.add((kind, form["granularity"]))
        parts |= {form["kind"], "mask" * (form["mask"] is not None), "share" * (form["share_bits"] is not None)}
    assert seen == {(k, g) for k in LAYERS for g in GRANULARITIES}
    assert {"grid", "binary", "ternary", "mask", "share"} <= parts
