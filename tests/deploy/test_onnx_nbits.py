"""format=onnx with group-wise scales: MatMulNBits on the pipeline's own levels; bf16 models traced in float32."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lwpipe.deploy.onnx_nbits import pack, unpack
from lwpipe.grid import quantize_layer
from tests.deploy.conftest import lm_args
from tests.deploy.test_onnx import ops, run_fresh
from tests.helpers import run_recipe


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_levels_unpack_to_themselves_with_a_short_last_block(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(6, 40)).astype(np.int8)
    b = pack(q, bits, 16)
    assert b.shape == (6, 3, 16 * bits // 8) and b.dtype == np.uint8  # 40 inputs: blocks of 16, 16 and 8 + padding
    assert np.array_equal(unpack(b, bits, 40), q)
    assert np.all(unpack(b, bits, 48)[:, 40:] == 0)  # the padding is level 0 (the zero point)


def grouped_mlp(bits: int, group: int, inputs: int = 40) -> nn.Module:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 4))
    for m in (mlp[0], mlp[2]):
        quantize_layer(m, bits, "symmetric", per_channel=True, group=group)
    return mlp.eval()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_grouped_layers_run_matmul_nbits_on_their_own_levels(tmp_path, bits):
    from lwpipe.constraints import constraint
    from lwpipe.deploy.onnx import build

    mlp = grouped_mlp(bits, 16)  # 40 inputs: the last group holds 8
    info = build(mlp, torch.randn(2, 40), tmp_path / "m.onnx")
    assert info["layers"] == {"0": "matmul_nbits", "2": "matmul_nbits"}
    proto = onnx.load(str(tmp_path / "m.onnx"))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and "MatMul" not in ops(tmp_path / "m.onnx")
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    node = next(n for n in nodes if dict((a.name, a.i) for a in n.attribute)["K"] == 40)
    width = dict((a.name, a.i) for a in node.attribute)["bits"]
    assert width == (4 if bits <= 4 else 8)
    c = constraint(mlp[0])
    want = torch.round(mlp[0].weight / c.grid()[0]).to(torch.int8).numpy()
    assert np.array_equal(unpack(init[node.input[1]], width, 40), want)  # the pipeline's levels, not re-rounded
    x = torch.randn(7, 40)
    with torch.no_grad():
        y = mlp(x).numpy()
    np.testing.assert_allclose(run_fresh(tmp_path / "m.onnx", {"input": x}, tmp_path), y, rtol=1e-5, atol=1e-5)


def test_a_group_ort_cannot_take_stays_fp32_and_is_listed(tmp_path):
    from lwpipe.deploy.onnx import OrtModule, build

    mlp = grouped_mlp(4, 10)  # not a power of two: MatMulNBits' block_size cannot be 10
    info = build(mlp, torch.randn(2, 40), tmp_path / "m.onnx")
    assert info["layers"] == {"0": "float", "2": "float"} and "MatMulNBits" not in ops(tmp_path / "m.onnx")
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(OrtModule(tmp_path / "m.onnx")(x), mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gptq_llama_exports_its_groups_and_a_bf16_model_traces_in_float32(lm_files, tmp_path, dtype):
    """gptq_w4's groups run as MatMulNBits; a bf16 checkpoint (torch's tracer stops on it) is written float32."""
    from tests.hf_helpers import save_llama

    path = save_llama(tmp_path / "llama", dtype=getattr(torch, dtype))
    args = lm_args(lm_files, "llama", "++stages.export.format=onnx", "measure.latency=false")
    args = [f"model.path={path}" if a.startswith("model.path=") else a for a in args]
    run_recipe(args, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "export.json").read_text())["onnx"]
    assert info["nbits_layers"] == 14 and set(info["layers"].values()) == {"matmul_nbits"}  # 2 blocks x 7
    assert info.get("converted_from") == (None if dtype == "float32" else "bfloat16")
    assert info["reference"] == "uncompressed" and info["agreement_with_model"] >= (0.99 if dtype == "float32" else 0.9)
    assert (tmp_path / "run" / info["file"]).stat().st_size == info["bytes"]


def test_gpt2_conv1d_groups_run_as_matmul_nbits(lm_files, tmp_path):
    """transformers' Conv1D stores (in, out) and traces as Gemm(x, W, b) without transB: found and rewritten."""
    run_recipe(lm_args(lm_files, "gpt2", "++stages.export.format=onnx", "measure.latency=false"), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "export.json").read_text())["onnx"]
    assert info["nbits_layers"] == 8 and set(info["layers"].values()) == {"matmul_nbits"}  # 2 blocks x 4
    assert info["agreement_with_model"] >= 0.99


def test_a_tied_head_holds_its_token_table_once_in_the_file(lm_files, tmp_path):
    """torch's exporter folds a tied head's transpose into a second copy of the table; the file reads the one."""
    run_recipe(lm_args(lm_files, "gpt2", "++stages.export.format=onnx", "pipeline=[export]"), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "export.json").read_text())["onnx"]
    assert info["tied_tables"] == ["model.transformer.wte.weight"] and info["agreement"] == 1.0
    proto = onnx.load(str(tmp_path / "run" / info["file"]))
    dims = {t.name: sorted(t.dims) for t in proto.graph.initializer}
    table = dims["model.transformer.wte.weight"]
    assert [n for n, d in dims.items() if d == table] == ["model.transformer.wte.weight"]  # no transposed copy
    assert "Transpose" in ops(tmp_path / "run" / info["file"])


def test_a_file_over_protobufs_limit_keeps_its_tensors_beside_it(tmp_path, monkeypatch):
    """Over 2 GiB of tensors (here: a limit of 1 KiB) the graph is written with ONNX's external data."""
    from lwpipe.deploy import onnx as onnx_form
    from lwpipe.deploy import onnx_store

    monkeypatch.setattr(onnx_store, "PROTO_LIMIT", 1024)
    mlp = grouped_mlp(4, 16, inputs=400)  # its first layer's packed levels: 32 x 400 / 2 bytes
    info = onnx_form.build(mlp, torch.randn(2, 400), tmp_path / "m.onnx")
    data = tmp_path / info["data_file"]
    assert info["data_file"] == "m.onnx.data" and data.stat().st_size >= 32 * 400 // 2
    assert (tmp_path / "m.onnx").stat().st_size < data.stat().st_size  # the graph and its small tensors
    x = torch.randn(3, 400)
    with torch.no_grad():
        y = mlp(x).numpy()
    np.testing.assert_allclose(run_fresh(tmp_path / "m.onnx", {"input": x}, tmp_path), y, rtol=1e-5, atol=1e-5)
