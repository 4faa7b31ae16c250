"""ONNX graph surgery for `format: onnx`: the quantize stage's own integer levels put into an fp32 graph.

A Linear layer on a symmetric grid of 8 bits or fewer becomes, in place of its MatMul / Gemm,

    x -> DynamicQuantizeLinear -> MatMulInteger(x_q, W_q int8, x_zp) -> Cast -> Mul(x_scale * w_scale) [-> + b]

(the pattern ONNX Runtime's own `quantize_dynamic` writes, which ORT fuses into one int8 kernel), its
W_q being exactly the pipeline's levels and w_scale its per-tensor or per-channel scales. Other quantized
weights (convolutions) stay fp32: behind a DequantizeLinear ORT would dequantize them on every call.
Weights are found in the graph by their values (the exporter renames and transposes initializers), so the
graph's numbers never change: only their storage and kernel do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lwpipe.deploy.levels import weight_key as _key
from lwpipe.deploy.onnx_nbits import nbits_nodes
from lwpipe.deploy.onnx_store import values


def _init_map(graph) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _dynamic_matmul(name: str, x: str, y: str, wq: np.ndarray, scale: np.ndarray, bias: str | None, inv=None):
    """Nodes and initializers of y = (x @ W) (+ bias) with int8 W (in, out) and per-column scales; `inv`: the
    smoothing's 1/s, x's channels multiplied by it first (lwpipe.deploy.onnx_smooth)."""
    p = f"{name}_q"
    inits = [
        numpy_helper.from_array(wq.astype(np.int8), f"{p}_W"),
        numpy_helper.from_array(scale.astype(np.float32), f"{p}_Wscale"),
    ]
    mm_out = f"{p}_mm" if bias else y
    nodes = []
    if inv is not None:  # named by its values: layers sharing an input and an s share one Mul after ORT's CSE
        factor = f"smooth_{hashlib.sha1(inv.astype(np.float32).tobytes()).hexdigest()[:16]}"
        inits.append(numpy_helper.from_array(inv.astype(np.float32), factor))
        nodes.append(helper.make_node("Mul", [x, factor], [f"{p}_xsm"], name=f"{p}_smooth"))
        x = f"{p}_xsm"
    nodes += [
        helper.make_node("DynamicQuantizeLinear", [x], [f"{p}_x", f"{p}_xs", f"{p}_xzp"], name=f"{p}_dql"),
        helper.make_node("MatMulInteger", [f"{p}_x", f"{p}_W", f"{p}_xzp"], [f"{p}_i32"], name=f"{p}_mmi"),
        helper.make_node("Cast", [f"{p}_i32"], [f"{p}_f"], to=TensorProto.FLOAT, name=f"{p}_cast"),
        helper.make_node("Mul", [f"{p}_xs", f"{p}_Wscale"], [f"{p}_s"], name=f"{p}_scale"),
        helper.make_node("Mul", [f"{p}_f", f"{p}_s"], [mm_out], name=f"{p}_mul"),
    ]
    if bias:
        nodes.append(helper.make_node("Add", [mm_out, bias], [y], name=f"{p}_bias"))
    return nodes, inits


def quantize_graph(model: onnx.ModelProto, layers: dict, base: Path | None = None) -> dict[str, str]:
    """Rewrite `model` in place. `layers`: name -> (kind, float weight W as the layer stores it, int8 levels,
    per-output-channel scales, out axis[, 1/s of a smoothed Linear's input channels]), or group_levels' entries.
    Returns name -> how it was written: matmul_integer, matmul_nbits, float (a convolution, a grid MatMulNBits
    cannot hold, or a node of another form: the exact fp32 weight stays) or absent (no output reads it).
    `base`: the directory of the graph's external tensors (lwpipe.deploy.onnx_store), read one at a time."""
    graph = model.graph
    by_value: dict[tuple, str] = {}
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2:
            by_value.setdefault(_key(values(t, base)), t.name)
    users = _consumers(graph)
    how: dict[str, str] = {}
    new_nodes, new_inits = {}, []
    for name, (kind, w, *rest) in layers.items():
        if kind in ("nbits", "grouped"):  # w: the weight's keys, from lwpipe.deploy.onnx_nbits.group_levels
            plain, transposed = (by_value.get(k) for k in w)
        else:
            plain, transposed = by_value.get(_key(w)), by_value.get(_key(w.T)) if w.ndim == 2 else None
        how[name] = "float" if plain or transposed else "absent"  # absent: the traced outputs never read it
        if kind not in ("linear", "nbits"):
            continue
        for n, bias in _products(users, plain, transposed):
            if kind == "nbits":
                nodes, ins = nbits_nodes(n.name or n.input[1], n.input[0], n.output[0], *rest, bias)
                how[name] = "matmul_nbits"
            else:
                q, s, _, *smoothed = rest
                inv = smoothed[0] if smoothed else None
                nodes, ins = _dynamic_matmul(n.name or n.input[1], n.input[0], n.output[0], q.T, s, bias, inv)
                how[name] = "matmul_integer"
            new_nodes[id(n)] = nodes
            new_inits += ins
    _splice(graph, new_nodes, new_inits)
    return how


def _products(users: dict, plain: str | None, transposed: str | None):
    """(node, bias) of each node computing x @ W^T (+ b) from W's initializer `plain` or W^T's `transposed`:
    MatMul(x, W^T), Gemm(x, W, b, transB=1) or Gemm(x, W^T, b) (transformers' Conv1D), plain alpha and beta."""
    for found in dict.fromkeys(f for f in (transposed, plain) if f):
        for n in users.get(found, []):
            if n.input[1] != found:
                continue
            if n.op_type == "MatMul" and found == transposed:
                yield n, None
            elif n.op_type == "Gemm":
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                if attrs.get("transA") or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                    continue
                if found == (plain if attrs.get("transB") else transposed):
                    yield n, n.input[2] if len(n.input) > 2 and n.input[2] else None


def share_transposed(model: onnx.ModelProto, base: Path | None = None) -> list[str]:
    """A MatMul weight that is another initializer transposed (a tied LM head: the exporter folds the head's
    transpose of the token table into a second copy) reads that initializer through a Transpose node, which
    ONNX Runtime folds when the session loads: the file holds the table once. Returns the tables shared."""
    graph = model.graph
    inits = _init_map(graph)
    big = {n: t for n, t in inits.items() if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    heads = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in big}
    tables = {n: t for n, t in big.items() if n not in heads}
    shapes = {tuple(t.dims) for t in tables.values()}
    heads = {h for h in heads if tuple(reversed(big[h].dims)) in shapes}  # only these can be a table transposed
    if not heads:
        return []
    wanted = {tuple(reversed(big[h].dims)) for h in heads}
    by_value = {_key(values(t, base)): n for n, t in tables.items() if tuple(t.dims) in wanted}
    shared, nodes = {}, []
    for name in sorted(heads):
        other = by_value.get(_key(values(big[name], base).T))
        if other:
            shared[name] = f"{other}_transposed"
            nodes.append(helper.make_node("Transpose", [other], [shared[name]], perm=[1, 0], name=f"{other}_T"))
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x in shared:
                n.input[i] = shared[x]
    order = [*nodes, *graph.node]
    del graph.node[:]
    graph.node.extend(order)
    keep = [t for t in graph.initializer if t.name not in shared]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return sorted({n.input[0] for n in nodes})


def _splice(graph, new_nodes: dict, new_inits: list) -> None:
    """Replace rewritten nodes by their new ones, drop the float weights no node reads any more."""
    order = []
    for n in graph.node:
        order += new_nodes.get(id(n), [n])
    del graph.node[:]
    graph.node.extend(order)
    names = {t.name for t in graph.initializer}
    for t in new_inits:  # a shared smoothing factor once
        if t.name not in names:
            graph.initializer.append(t)
            names.add(t.name)
    read = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)
