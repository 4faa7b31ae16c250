"""`format: onnx` with `activations: static`: the convolutions (and Linear layers, residual adds, pooling) run
ONNX Runtime's int8 kernels (QLinearConv, QGemm, QLinearAdd, ...) on activation scales calibrated beforehand.

ORT's `quantize_static` writes the QDQ form of the traced fp32 file (QuantizeLinear / DequantizeLinear around
each op; ORT's optimizer fuses each group into one int8 kernel when the session loads): uint8 activations with
MinMax ranges over `calibration_batches` training batches, int8 symmetric per-output-channel weights (uint8 x
int8 is the pair ORT's x86 int8 convolution kernels take). Then each weight the quantize stage put on a
symmetric grid of 8 bits or fewer gets the pipeline's own levels back in place of ORT's rounding (a folded
BatchNorm's factor goes into its scale, its sign into the levels), and its int32 bias is quantized again at the
new scale. A weight without such a grid keeps ORT's per-channel rounding of its float value: the file is then
approximate (export.json's `approximate` lists those layers; its quality, scored by ORT against the uncompressed
reference, says by how much).

BatchNorm is folded into the convolution before tracing (`folded`), so that the traced weights are the ones
whose levels and factors are known here.
"""

from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

WEIGHTED = ("Conv", "Gemm", "MatMul")
# reduce_range's largest weight level (ORT's): 2 x 255 x 64 uint8 x int8 products fit 16 bits (x86 without VNNI)
REDUCED = 64


def folded(model: nn.Module, levels: dict) -> tuple[nn.Module, dict]:
    """The model's plain copy with each BatchNorm folded into its convolution, and `levels` (layer_levels'
    dict) for the folded weights: the factor f of a folded layer multiplies its scales, f's sign flips its
    levels (scales stay positive). The traced graph then holds these weights as they are, so that they are
    found by value (the exporter's own folding would give weights no level matches)."""
    from lwpipe import export

    plain = export.plain_copy(model).cpu().eval()
    factors = export.fold_batchnorm(plain)
    mods = dict(plain.named_modules())
    out = {}
    for name, (kind, w, q, s, axis, *rest) in levels.items():
        if name in factors:
            f = factors[name].detach().float().cpu().numpy()
            w, s = mods[name].weight.detach().float().cpu().numpy(), s * f
            shape = [1] * q.ndim
            shape[axis] = -1
            q = (q.astype(np.int16) * np.where(s < 0, -1, 1).astype(np.int16).reshape(shape)).astype(np.int8)
            s = np.abs(s).astype(np.float32)
        out[name] = (kind, w, q, s, axis, *rest)
    return plain, out


def weights(plain: nn.Module) -> dict[str, np.ndarray]:
    """name -> weight of every convolution and Linear of the (folded, plain) model."""
    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    return {n: m.weight.detach().float().cpu().numpy() for n, m in plain.named_modules() if isinstance(m, kinds)}


def _key(a: np.ndarray) -> tuple:
    return a.shape, np.ascontiguousarray(a, dtype=np.float32).tobytes()


def weighted_nodes(proto: onnx.ModelProto, layer_weights: dict) -> dict[str, tuple[str, bool]]:
    """Node name -> (layer, transposed) for each Conv / Gemm / MatMul of the fp32 file whose weight initializer
    is a layer's weight (as stored, or transposed: the exporter writes MatMul's weight as W^T)."""
    by_value = {}
    for name, w in layer_weights.items():
        by_value[_key(w)] = (name, False)
        if w.ndim == 2:
            by_value.setdefault(_key(w.T), (name, True))
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in inits:
            hit = by_value.get(_key(numpy_helper.to_array(inits[n.input[1]])))
            if hit:
                out[n.name] = hit
    return out


def quantize(src: Path, dst: Path, calibration: list[torch.Tensor], exclude: list[str], reduce_range=False) -> None:
    """ORT's quantize_static of `src` into `dst` (QDQ, uint8 activations, int8 per-channel weights; 7-bit
    weights with `reduce_range`)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: b.detach().float().cpu().numpy()} for b in calibration])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude,
        reduce_range=reduce_range,
    )


def excluded(nodes: dict, float_layers) -> list[str]:
    """Node names of the layers `float_layers` (globs) keeps in fp32."""
    return [n for n, (layer, _) in nodes.items() if any(fnmatch.fnmatchcase(layer, g) for g in float_layers)]


def build_static(
    plain: nn.Module, fp32: Path, out: Path, levels: dict, calibration, float_layers=(), reduce_range=False
) -> dict:
    """Quantize the traced fp32 file `fp32` into `out`; layer -> how it was written: int8_levels (the
    pipeline's levels), int8_rounded (ORT's rounding of the float weight), float, or absent. `reduce_range`:
    7-bit weights (levels within +-REDUCED); a layer whose own levels go beyond keeps ORT's rounding."""
    proto = onnx.load(str(fp32))
    nodes = weighted_nodes(proto, weights(plain))
    biases = {n.name: n.input[2] for n in proto.graph.node if n.name in nodes and len(n.input) > 2 and n.input[2]}
    floats = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in biases.values()}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "static.onnx"
        quantize(fp32, raw, calibration, excluded(nodes, float_layers), reduce_range)
        q = onnx.load(str(raw))
    how = {layer: "absent" for layer in weights(plain)}
    for node_name, (layer, transposed) in nodes.items():
        bias = floats.get(biases.get(node_name, ""))
        level = levels.get(layer)
        if reduce_range and level is not None and int(np.abs(level[2]).max(initial=0)) > REDUCED:
            level = None  # its levels would overflow what a CPU without VNNI adds up in 16 bits
        how[layer] = restore(q.graph, node_name, level, transposed, bias)
    onnx.save(q, str(out))
    return how


def _producers(graph) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def restore(graph, node_name: str, level, transposed: bool, bias) -> str:
    """Put the pipeline's levels (`level`: layer_levels' entry, or None) into the DequantizeLinear that feeds
    node `node_name` its weight, and quantize its bias again at the new scale. Returns how it is written."""
    node = next(n for n in graph.node if n.name == node_name)
    made = _producers(graph)
    inits = {t.name: t for t in graph.initializer}
    wdq = made.get(node.input[1])
    if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
        return "float"  # ORT left it in fp32 (float_layers, or an op it does not quantize)
    if level is None:
        return "int8_rounded"
    _, _, q, s, _ = level[:5]
    axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
    scales = numpy_helper.to_array(inits[wdq.input[1]])
    q = q.T if transposed else q
    if scales.size != q.shape[1 if transposed else 0] or axis != (1 if transposed else 0):
        return "int8_rounded"  # ORT's scales run along another axis than the layer's output channels
    s = np.asarray(s, np.float64).reshape(-1)  # positive: folded() moved a BatchNorm's sign into the levels
    _put(inits[wdq.input[0]], q.astype(np.int8))
    _put(inits[wdq.input[1]], np.abs(s).astype(np.float32))
    bdq = made.get(node.input[2]) if len(node.input) > 2 else None
    xdq = made.get(node.input[0])
    if bias is not None and bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.input[0] in inits and xdq:
        x_scale = float(numpy_helper.to_array(inits[xdq.input[1]]))
        b_scale = (x_scale * np.abs(s)).astype(np.float32)
        _put(inits[bdq.input[0]], np.round(bias.astype(np.float64) / b_scale).astype(np.int32))
        _put(inits[bdq.input[1]], b_scale)
    return "int8_levels"


def _put(t: onnx.TensorProto, a: np.ndarray) -> None:
    """Overwrite initializer `t` with `a` (same name, same shape)."""
    if tuple(t.dims) != a.shape and not (len(t.dims) == 0 and a.size == 1):
        raise ValueError(f"{t.name}: shape {tuple(t.dims)} is not {a.shape}")
    t.CopyFrom(numpy_helper.from_array(a.reshape(tuple(t.dims)), t.name))
