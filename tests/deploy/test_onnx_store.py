"""A traced ONNX file's tensors read where they lie: what torch writes beside a graph over 2 GiB is never
loaded whole (lwpipe.deploy.onnx_store), and the file written from it holds the same numbers."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from lwpipe.deploy import onnx as onnx_form
from lwpipe.deploy import onnx_store
from tests.deploy.test_onnx import run_fresh
from tests.deploy.test_onnx_nbits import grouped_mlp


def external_trace(monkeypatch):
    """Make the tracer's file look like a model over 2 GiB: every tensor of 16 bytes or more beside it."""
    trace = onnx_form.trace

    def traced(plain, example, path):
        outputs = trace(plain, example, path)
        proto = onnx.load(str(path))
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=16)
        return outputs

    monkeypatch.setattr(onnx_form, "trace", traced)


def test_values_maps_an_external_tensor_without_loading_it(tmp_path):
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"), save_as_external_data=True, size_threshold=0)
    proto = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    t = proto.graph.initializer[0]
    assert not t.raw_data and onnx_store.nbytes(t) == w.nbytes  # nothing read into the graph
    got = onnx_store.values(t, tmp_path)
    assert isinstance(got, np.memmap) and np.array_equal(got, w)


@pytest.mark.parametrize("limit", [1024, None])
def test_a_traced_file_with_external_tensors_is_rewritten_from_them(tmp_path, monkeypatch, limit):
    """Levels are found by value in the memory-mapped tensors, the kept float ones are copied across, and the
    output is one file again when it fits (a 4-bit model of a large float one) or a graph and its data file."""
    external_trace(monkeypatch)
    if limit:
        monkeypatch.setattr(onnx_store, "PROTO_LIMIT", limit)
    mlp = grouped_mlp(4, 16, inputs=400)
    info = onnx_form.build(mlp, torch.randn(2, 400), tmp_path / "m.onnx")
    assert info["layers"] == {"0": "matmul_nbits", "2": "matmul_nbits"}
    assert ("data_file" in info) == bool(limit) and (tmp_path / "m.onnx.data").exists() == bool(limit)
    x = torch.randn(5, 400)
    with torch.no_grad():
        y = mlp(x).numpy()
    np.testing.assert_allclose(run_fresh(tmp_path / "m.onnx", {"input": x}, tmp_path), y, rtol=1e-5, atol=1e-5)


def test_a_tied_head_found_in_external_tensors_keeps_one_table(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    external_trace(monkeypatch)
    monkeypatch.setattr(onnx_store, "PROTO_LIMIT", 1024)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=2, use_cache=False)
    cfg.bos_token_id = cfg.eos_token_id = 0
    lm = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 97, (2, 9))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    info = onnx_form.build(lm, example, tmp_path / "m.onnx")
    assert info["tied_tables"] == ["model.transformer.wte.weight"]
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    tables = [t.name for t in proto.graph.initializer if sorted(t.dims) == [32, 97]]
    assert tables == ["model.transformer.wte.weight"]
    with torch.no_grad():
        want = lm(**example).logits.numpy()
    got = run_fresh(tmp_path / "m.onnx", example, tmp_path)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
