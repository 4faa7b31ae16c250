"""Group-wise levels (GPTQ's `group_size`) into ONNX: ONNX Runtime's MatMulNBits (com.microsoft domain).

A Linear (or transformers' Conv1D) on a symmetric grid of 8 bits or fewer with one scale per output channel
and group of inputs is written as

    y = MatMulNBits(x, B, scales)          bits 2, 4 or 8; block_size = the group; zero point 2^(bits-1)

B holding the pipeline's own levels, offset by 2^(bits-1) and packed little end first (two 4-bit levels a
byte), one row per output channel and one block per group; a last group shorter than the others is padded
with the zero point (level 0). ORT computes q * scale per block in float32 and multiplies in float32
(accuracy_level 0): the weights are the grid's values, as exact as the int8 path's. Groups ORT cannot take
(not a power of two, under 16), zero points and codebooks stay fp32 weights.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import torch
from onnx import helper, numpy_helper
from torch import nn

DOMAIN = "com.microsoft"
BITS = (2, 4, 8)


def fits(info: dict) -> int | None:
    """The MatMulNBits width that holds a layer's grid (layer_grid's info), or None."""
    group = info["group"]
    if group is None or group < 16 or group & (group - 1) or not info["symmetric"]:
        return None
    return next((b for b in BITS if info["qmin"] >= -(1 << (b - 1)) and info["qmax"] < (1 << (b - 1))), None)


@torch.no_grad()
def group_levels(model: nn.Module, float_layers=()) -> dict:
    """name -> ("nbits", keys, int8 levels (out, in), scales (out, groups), bits, group) for each layer
    MatMulNBits can hold; other grouped layers -> ("grouped", keys): written fp32. `keys`: the effective
    weight's (out, in) and (in, out) identities in the traced graph (lwpipe.deploy.levels.weight_key)."""
    from lwpipe.constraints import compressible_layers, constraint
    from lwpipe.deploy.levels import layer_grid
    from lwpipe.deploy.levels import weight_key as _key

    out = {}
    for name, m in compressible_layers(model):
        c = constraint(m)
        if c is None or not c.quantized or c.group is None or any(fnmatch.fnmatchcase(name, g) for g in float_layers):
            continue
        grid = layer_grid(m)
        if grid is None:
            continue
        w, q, scale, info = grid
        keys = (_key(w.numpy()), _key(w.numpy().T))
        bits = fits(info)
        if bits is None:
            out[name] = ("grouped", keys)
            continue
        group = info["group"]
        out[name] = ("nbits", keys, q.to(torch.int8).numpy(), scale[:, ::group].contiguous().numpy(), bits, group)
    return out


def pack(q: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Levels (N, K) -> MatMulNBits' B (N, blocks, group * bits / 8) uint8: offset by 2^(bits-1), a short
    last block padded with the zero point, the first level of a byte in its low bits."""
    n, k = q.shape
    blocks = -(-k // group)
    u = np.full((n, blocks * group), 1 << (bits - 1), dtype=np.uint8)
    u[:, :k] = q.astype(np.int16) + (1 << (bits - 1))
    u = u.reshape(n, blocks, group)
    per = 8 // bits
    out = np.zeros((n, blocks, group // per), dtype=np.uint8)
    for j in range(per):
        out |= u[:, :, j::per] << np.uint8(bits * j)
    return out


def unpack(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """pack's inverse: the levels (N, K) as int8 (for reading a file back)."""
    n, blocks, width = b.shape
    per = 8 // bits
    u = np.empty((n, blocks, width * per), dtype=np.int16)
    for j in range(per):
        u[:, :, j::per] = (b >> np.uint8(bits * j)) & np.uint8((1 << bits) - 1)
    return (u.reshape(n, -1)[:, :k] - (1 << (bits - 1))).astype(np.int8)


def nbits_nodes(name: str, x: str, y: str, q: np.ndarray, scales: np.ndarray, bits: int, group: int, bias):
    """Nodes and initializers of y = x @ W^T (+ bias), W = levels q (N, K) times their group's scale."""
    n, k = q.shape
    p = f"{name}_nbits"
    inits = [numpy_helper.from_array(pack(q, bits, group), f"{p}_B"), numpy_helper.from_array(scales, f"{p}_S")]
    mm_out = f"{p}_mm" if bias else y
    attrs = {"K": k, "N": n, "bits": bits, "block_size": group, "accuracy_level": 0}
    nodes = [helper.make_node("MatMulNBits", [x, f"{p}_B", f"{p}_S"], [mm_out], name=p, domain=DOMAIN, **attrs)]
    if bias:
        nodes.append(helper.make_node("Add", [mm_out, bias], [y], name=f"{p}_bias"))
    return nodes, inits


def use_domain(model) -> None:
    """The com.microsoft opset import MatMulNBits needs (once)."""
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
