"""format=onnx, activations=static: ORT's int8 convolutions on calibrated activation scales and, where the
quantize stage left an 8-bit grid, on the pipeline's own levels (not ORT's rounding)."""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from lwpipe.config import validate
from lwpipe.errors import ConfigError
from tests.deploy.test_onnx import run_fresh
from tests.helpers import TINY, compose_recipe, run_recipe


def has_vnni() -> bool:
    """The CPU adds uint8 x int8 products in 32 bits (VNNI); elsewhere than Linux, assumed."""
    if sys.platform != "linux":
        return True
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    return "avx512_vnni" in flags or "avx_vnni" in flags


VNNI = has_vnni()


def small_cnn(levels: bool) -> nn.Module:
    """Conv-BN-ReLU-Conv-ReLU-pool-Linear; with `levels`, every layer on a symmetric per-channel grid whose
    largest level is 100 (ORT's own rounding would put it at 127: other numbers)."""
    from lwpipe.constraints import ensure_constraint

    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    bn = cnn[1]
    bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data = torch.linspace(-1.5, 1.5, 8)  # negative factors too: their sign goes into the levels
    if levels:
        for m in (cnn[0], cnn[3], cnn[7]):
            dims = tuple(range(1, m.weight.dim()))
            s = m.weight.detach().abs().amax(dim=dims, keepdim=True) / 100
            ensure_constraint(m).set_quant(8, -127, 127, s, torch.zeros_like(s), 0)
            m.weight.data = torch.round(m.weight.data / s) * s
    return cnn.eval()


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(4)]


def optimized_ops(path, tmp_path) -> list[str]:
    """The node types ORT runs after its own graph optimisation (QDQ groups fused into int8 kernels)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def weight_dequantizers(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Conv / Gemm node name -> (int8 weight, its scales), for each whose weight a DequantizeLinear gives."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}
    out = {}
    for n in graph.node:
        if n.op_type in ("Conv", "Gemm"):
            dq = made.get(n.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear":
                out[n.name] = (inits[dq.input[0]], inits[dq.input[1]])
    return out


def test_static_cnn_runs_int8_kernels_on_the_pipelines_levels_without_lwpipe(tmp_path):
    from lwpipe import export
    from lwpipe.deploy.onnx import build

    cnn = small_cnn(levels=True)
    info = build(cnn, calibration()[0][:2], tmp_path / "m.onnx", static=calibration())
    assert info["layers"] == {"0": "int8_levels", "3": "int8_levels", "7": "int8_levels"} and info["approximate"] == []
    ops = optimized_ops(tmp_path / "m.onnx", tmp_path)
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "QGemm" in ops
    folded = export.dense_form(cnn)  # BatchNorm folded: what the file's first convolution computes
    want = {"0": folded[0].weight, "3": folded[3].weight, "7": folded[7].weight}
    got = weight_dequantizers(tmp_path / "m.onnx")
    assert len(got) == 3
    for (q, s), (name, w) in zip(got.values(), want.items()):
        assert q.dtype == np.int8 and np.abs(q).max() == 100  # the pipeline's levels, not ORT's (127)
        back = q.astype(np.float32) * s.reshape(-1, *[1] * (q.ndim - 1))
        np.testing.assert_allclose(back, w.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        want_y = cnn(x).numpy()
    got_y = run_fresh(tmp_path / "m.onnx", {"input": x}, tmp_path)  # onnxruntime alone, lwpipe not importable
    err = np.linalg.norm(got_y - want_y) / np.linalg.norm(want_y)
    assert 0 < err < 0.03, err  # activations on 8 bits: close to the fake-quant model, not equal


def test_static_without_a_grid_rounds_the_float_weights_and_says_the_file_is_approximate(tmp_path):
    from lwpipe.deploy.onnx import OrtModule, build

    cnn = small_cnn(levels=False)
    info = build(cnn, calibration()[0][:2], tmp_path / "m.onnx", static=calibration(), float_layers=["7"])
    assert info["layers"] == {"0": "int8_rounded", "3": "int8_rounded", "7": "float"}
    assert info["approximate"] == ["0", "3"]
    ops = optimized_ops(tmp_path / "m.onnx", tmp_path)
    assert ops.count("QLinearConv") == 2 and "Gemm" in ops and "QGemm" not in ops  # the float layer stays fp32
    got = weight_dequantizers(tmp_path / "m.onnx")
    assert len(got) == 2 and all(np.abs(q).max() == 127 for q, _ in got.values())  # ORT's per-channel rounding
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        want = cnn(x)
    got = OrtModule(tmp_path / "m.onnx")(x)
    err = ((got - want).norm() / want.norm()).item()
    assert err > 0
    if VNNI:  # without it, ORT adds pairs of uint8 x int8 products in 16 bits: full-range weights saturate
        assert err < 0.03, err


def test_reduce_range_writes_7_bit_weights_that_do_not_saturate_without_vnni(tmp_path):
    """ORT's reduce_range: weights within +-64, so a CPU without VNNI computes them as one with it does; the
    pipeline's levels are kept where they fit (small_cnn's reach 100: they do not) and the rest rounded."""
    from lwpipe.deploy.onnx import OrtModule, build

    x = torch.randn(64, 3, 8, 8)
    for levels in (False, True):
        cnn = small_cnn(levels=levels)
        path = tmp_path / f"m{levels}.onnx"
        info = build(cnn, calibration()[0][:2], path, static=calibration(), reduce_range=True)
        assert info["layers"] == {"0": "int8_rounded", "3": "int8_rounded", "7": "int8_rounded"}
        assert all(np.abs(q).max() <= 64 for q, _ in weight_dequantizers(path).values())
        with torch.no_grad():
            want = cnn(x)
        err = ((OrtModule(path)(x) - want).norm() / want.norm()).item()
        assert 0 < err < 0.03, err


def test_reduce_range_keeps_levels_that_fit_7_bits(tmp_path):
    from lwpipe.constraints import ensure_constraint
    from lwpipe.deploy.onnx import build

    cnn = small_cnn(levels=True)
    m = cnn[3]
    s = m.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 60  # a 7-bit grid: levels within 60
    ensure_constraint(m).set_quant(7, -63, 63, s, torch.zeros_like(s), 0)
    m.weight.data = torch.round(m.weight.data / s) * s
    info = build(cnn, calibration()[0][:2], tmp_path / "m.onnx", static=calibration(), reduce_range=True)
    assert info["layers"]["3"] == "int8_levels" and info["layers"]["0"] == "int8_rounded"
    assert info["approximate"] == ["0", "7"]


def test_reduce_range_without_static_activations_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="reduce_range"):
        validate(
            compose_recipe(
                [
                    *TINY,
                    "pipeline=[quantize,export]",
                    "++stages.export.format=onnx",
                    "++stages.export.reduce_range=true",
                ]
            )
        )


def test_resnet_through_the_runner_records_static_int8_layers(tmp_path):
    overrides = [
        "recipe=resnet_cifar_like",
        "data.n=120",
        "model.widths=[8,16]",
        "pipeline=[train,quantize,export]",
        "stages.train.epochs=1",
        "stages.quantize.finetune.epochs=0",
        "++stages.quantize.scheme=symmetric",
        "+stages.export.format=onnx",
        "+stages.export.activations=static",
        "+stages.export.calibration_batches=2",
    ]
    run_recipe(overrides, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "export.json").read_text())["onnx"]
    assert info["activations"] == "static" and info["approximate"] == []
    convs = {k: v for k, v in info["layers"].items() if k != "fc"}
    assert len(convs) == 6 and set(info["layers"].values()) == {"int8_levels"}
    assert info["int8_layers"] == 7 and info["reference"] == "uncompressed"
    assert info["agreement_with_model"] > 0.8  # 120 generated images, one epoch: loose, but the file follows
    ops = optimized_ops(tmp_path / "run" / info["file"], tmp_path)
    assert ops.count("QLinearConv") == 6 and "QLinearAdd" in ops


def test_static_with_smooth_is_refused_naming_both():
    from lwpipe.errors import ConfigError

    overrides = [*TINY, "pipeline=[train,quantize,export]", "+stages.export.format=onnx"]
    overrides += ["+stages.export.activations=static", "+stages.export.smooth=0.5"]
    with pytest.raises(ConfigError, match=r"format=onnx: smooth=0\.5 smooths .* activations=static") as e:
        validate(compose_recipe(overrides))
    assert "\n" not in str(e.value)
