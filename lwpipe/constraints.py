"""The constraints compression stages leave on a weight, as one torch parametrization.

Every compressible layer (Linear, Conv1d/2d/3d, Embedding, transformers' GPT-2
`Conv1D`) gets at most one `Compressed` parametrization on its `weight`. Its forward is

    w = centroids[index]        if shared (k-means codebook)      else original
    w = fake_quant(w)           if quantized (on the codebook when shared)
    w = where(mask, w, 0)       if masked

Later training runs *through* these constraints, so they hold by construction:
pruned weights stay exactly zero, a shared layer never has more than
len(centroids) distinct values (gradients reach the centroids grouped by
cluster, as in Deep Compression), and quantized values stay on their integer
grid (straight-through estimator).

Layouts differ: Linear, Conv and Embedding keep output channels (Embedding: tokens)
on axis 0, transformers' Conv1D stores its weight transposed, [in, out], so its
output channels are axis 1 (`out_axis`, `in_axis`). Modules that compute with one
shared weight (GPT-2's `lm_head.weight is transformer.wte.weight`) are one layer:
`compressible_layers` yields the first of them, and the same `Compressed` instance
is registered on all of them (`ensure_constraint(module, tied)`), so they compute
with one constrained weight and the artifact stores it once.

The parts live by concern (this module re-exports their names, so `lwpipe.constraints` imports keep
working): layer types and layouts in lwpipe/layout.py, the `Compressed` parametrization in
lwpipe/compressed.py, float16 / 8-bit held biases in lwpipe/held.py, helpers over a model in
lwpipe/model_layers.py; the model-wide spec (save / load) here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.compressed import (  # noqa: F401  (re-exported: lwpipe.constraints is the public face)
    GRID_AXES,
    Compressed,
    _RoundSTE,
    _SignSTE,
    constraint,
    dequantize,
    ensure_constraint,
    ensure_constraint_as,
    grid_axis,
    grid_shape,
    release_original,
    scale_shape,
)
from lwpipe.held import (  # noqa: F401
    BIAS_LEVELS,
    GridBias,
    HalfBias,
    _stored,
    bias_dtype,
    grid_attrs,
    half_attrs,
    hold_grid,
    hold_half,
    set_grid,
    set_half,
    set_half_bias,
)
from lwpipe.layout import (  # noqa: F401
    COMPRESSIBLE,
    NORMS,
    in_axis,
    index_dtype,
    is_compressible,
    is_hf_conv1d,
    out_axis,
)
from lwpipe.model_layers import (  # noqa: F401
    check_layer_patterns,
    clone,
    compressible_layers,
    effective_tensors,
    kept_kinds,
    layer_setting,
    original_weight,
    parameter_shapes,
    plain_parameters,
    tensor_aliases,
    tied_layers,
    trainable_parameters,
    unknown_layer_patterns,
)


@torch.no_grad()
def model_spec(model: nn.Module) -> dict[str, dict]:
    """JSON-able constraint layout: per layer its Compressed spec (+ "tied": the other modules sharing it),
    per module with float16-held tensors "half": their names."""
    ties = tied_layers(model)
    out = {}
    for n, m in model.named_modules():
        entry = {}
        if is_compressible(m) and (c := constraint(m)) is not None and n not in _tied_names(ties):
            entry.update(c.spec())
            if n in ties:
                entry["tied"] = [t for t, _ in ties[n]]
        if half := half_attrs(m):
            entry["half"] = half
        if grid := grid_attrs(m):
            entry["grid"] = list(grid)  # the scales are buffers: the state dict carries them
        if entry:
            out[n] = entry
    return out


def _tied_names(ties: dict) -> set[str]:
    return {t for group in ties.values() for t, _ in group}


def apply_spec(model: nn.Module, spec: Mapping[str, dict]) -> None:
    """Attach empty constraints so that a saved state dict loads into `model`."""
    modules = dict(model.named_modules())
    for name, s in spec.items():
        m = modules[name]
        for attr in [a for a in list(m.parametrizations) if a != "weight"] if parametrize.is_parametrized(m) else []:
            parametrize.remove_parametrizations(m, attr, leave_parametrized=False)
        if "shape" in s:
            tied = [(t, modules[t]) for t in s.get("tied", [])]
            for _, t in [(name, m)] + tied:
                if constraint(t) is not None:
                    parametrize.remove_parametrizations(t, "weight", leave_parametrized=False)
            for _, t in tied:  # the saved model computed both with one weight: so does this one
                if t.weight is not m.weight:
                    del t.weight
                    t.weight = m.weight
            c = Compressed.from_spec(s)
            ensure_constraint_as(m, c, tied)
            if s["shared"]:
                m.parametrizations.weight.original.requires_grad_(False)
        for attr in s.get("half", ["bias"] if s.get("bias") == "float16" else []):  # "bias": older specs
            set_half(m, attr)
        for attr in s.get("grid", []):
            set_grid(m, attr, torch.ones(()))
