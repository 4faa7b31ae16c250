"""format=onnx: the file runs in ONNX Runtime without lwpipe, matches the model, keeps the pipeline's levels."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from lwpipe.config import validate
from lwpipe.runner import build_data, build_model
from lwpipe.tasks import inputs
from tests.helpers import TINY, compose_recipe, run_recipe
from tests.hf_helpers import make_texts, save_bert, save_sentence_model, write_csv, write_txt

FRESH = """
import sys, numpy as np, onnxruntime as ort
sys.modules["lwpipe"] = None  # the file must not need lwpipe
path, feed_path, out_path = sys.argv[1:]
feed = dict(np.load(feed_path))
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
np.save(out_path, s.run(None, feed)[0])
"""


def run_fresh(path, feed: dict, tmp_path) -> np.ndarray:
    np.savez(tmp_path / "feed.npz", **{k: v.numpy() for k, v in feed.items()})
    subprocess.run(
        [sys.executable, "-c", FRESH, str(path), str(tmp_path / "feed.npz"), str(tmp_path / "y.npy")], check=True
    )
    return np.load(tmp_path / "y.npy")


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_quantized_mlp_runs_int8_kernels_on_its_levels_with_any_batch(tmp_path):
    overrides = [
        *TINY,
        "stages.train.epochs=3",
        "pipeline=[train,quantize,export]",
        "++stages.quantize.bits=8",
        "++stages.quantize.scheme=symmetric",
        "++stages.quantize.finetune.epochs=1",
        "+stages.export.format=onnx",
        "measure.repeats=3",
        "measure.warmup=1",
        "measure.batch=16",
    ]
    run_recipe(overrides, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "export.json").read_text())["onnx"]
    path = tmp_path / "run" / info["file"]
    assert path.exists() and info["bytes"] == path.stat().st_size
    assert info["int8_layers"] == 2 and set(info["layers"].values()) == {"matmul_integer"}
    assert "MatMulInteger" in ops(path) and "DynamicQuantizeLinear" in ops(path)
    assert info["reference"] == "uncompressed" and 0.9 <= info["agreement"] <= 1.0
    assert set(info["latency_ms"]) == {"1", "16"} and all(v > 0 for v in info["speedup"].values())
    init = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in init.values()) == 2
    for batch in (1, 7):
        x = torch.randn(batch, 8)
        y = run_fresh(path, {"input": x}, tmp_path)
        assert y.shape == (batch, 4)


def test_fp32_cnn_matches_pytorch_to_float_tolerance(tmp_path):
    from lwpipe.deploy.onnx import OrtModule, build

    torch.manual_seed(0)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
    ).eval()
    info = build(cnn, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    assert info["layers"] == {}
    form = OrtModule(tmp_path / "m.onnx")
    for batch in (1, 5):
        x = torch.randn(batch, 1, 8, 8)
        torch.testing.assert_close(form(x), cnn(x), rtol=1e-4, atol=1e-5)


def conv_net(batchnorm: bool) -> torch.nn.Module:
    from lwpipe.constraints import ensure_constraint

    torch.manual_seed(0)
    nn = torch.nn
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4) if batchnorm else nn.Identity(), nn.ReLU())
    cnn.append(nn.Flatten()).append(nn.Linear(144, 3))
    if batchnorm:  # statistics of their own: the fold changes the weight
        cnn[1].running_mean.uniform_(-1, 1), cnn[1].running_var.uniform_(0.5, 2), cnn[1].weight.data.uniform_(-2, 2)
    w = cnn[0].weight.detach()
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 7  # 4-bit per-channel grid
    ensure_constraint(cnn[0]).set_quant(4, -8, 7, scale, torch.zeros_like(scale), 0)
    return cnn.eval()


@pytest.mark.parametrize("batchnorm", [False, True])
def test_quantized_conv_is_written_as_its_fp32_weight_batchnorm_folded(tmp_path, batchnorm):
    """ORT would dequantize a DequantizeLinear weight on every call: the conv's exact fp32 weight is written,
    and a BatchNorm after it is folded in before tracing, so the layer is found (not called absent)."""
    from lwpipe.deploy.onnx import OrtModule, build

    cnn = conv_net(batchnorm)
    info = build(cnn, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    assert info["layers"] == {"0": "float"}
    assert "DequantizeLinear" not in ops(tmp_path / "m.onnx") and "BatchNormalization" not in ops(tmp_path / "m.onnx")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(OrtModule(tmp_path / "m.onnx")(x), cnn(x), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    rows = make_texts(64)
    return {
        "bert": save_bert(root / "bert"),
        "st": save_sentence_model(root / "st"),
        "train.csv": write_csv(root / "train.csv", rows[:40]),
        "test.csv": write_csv(root / "test.csv", rows[40:]),
        "train.txt": write_txt(root / "train.txt", rows[:40]),
        "test.txt": write_txt(root / "test.txt", rows[40:]),
    }


def text_run(files, recipe, model, ext, tmp_path, extra=()):
    overrides = [
        f"recipe={recipe}",
        f"model.path={files[model]}",
        f"data.train={files['train.' + ext]}",
        f"data.test={files['test.' + ext]}",
        "data.batch_size=8",
        "data.max_length=16",
        "eval.batch_size=8",
        "measure.repeats=2",
        "measure.warmup=1",
        "measure.batch=8",
        *extra,
        "+stages.export.format=onnx",
    ]
    run_recipe(overrides, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "export.json").read_text())["onnx"]
    top = validate(compose_recipe(overrides)).top
    return info, tmp_path / "run" / info["file"], build_data(top.data), build_model(top.model).eval()


def test_bert_classifier_fp32_matches_and_takes_any_batch_and_length(files, tmp_path):
    info, path, data, original = text_run(
        files, "bert_text_classification", "bert", "csv", tmp_path, ["pipeline=[export]"]
    )
    assert info["layers"] == {} and info["agreement"] == 1.0
    batch = inputs(data.test.batches(8)[0])
    for b, t in ((1, 5), (3, 11)):
        feed = {k: v[:b, :t] for k, v in batch.items()}
        feed["attention_mask"] = feed["attention_mask"].clone()
        feed["attention_mask"][0, -2:] = 0  # padding honoured, not baked in
        got = run_fresh(path, feed, tmp_path)
        with torch.no_grad():
            want = original(**feed).logits.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sentence_encoder_quantized_follows_its_grid(files, tmp_path):
    extra = ["pipeline=[quantize,export]", "++stages.quantize.bits=8", "++stages.quantize.scheme=symmetric"]
    info, path, data, original = text_run(files, "sentence_embedding", "st", "txt", tmp_path, extra)
    assert info["int8_layers"] == 12 and info["float_layers"] == 0  # 2 layers x (q, k, v, out, up, down)
    assert info["layers"]["transformer.pooler.dense"] == "absent"  # the embedding never reads the pooler
    assert "LayerNormalization" in ops(path) or info["fusions"]
    assert info["reference"] == "uncompressed" and 0.95 < info["quality"] < 1.0
    assert info["agreement_with_model"] > 0.99  # the file follows the quantized model it was made from
    batch = inputs(data.test.batches(8)[0])
    got = run_fresh(path, {k: v[:2, :7] for k, v in batch.items()}, tmp_path)
    assert got.shape == (2, 32) and np.isfinite(got).all()  # 7 tokens: the sequence axis is not baked in


def test_static_activations_for_a_text_model_are_refused_before_any_stage(files, tmp_path):
    from lwpipe.errors import ConfigError

    extra = ["pipeline=[export]", "+stages.export.activations=static"]
    with pytest.raises(ConfigError) as e:
        text_run(files, "sentence_embedding", "st", "txt", tmp_path, extra)
    msg = str(e.value)
    assert msg.startswith("stages.export.activations='static': dynamic or auto for a text model with format=onnx")
    assert "\n" not in msg and not (tmp_path / "run" / "checkpoints").exists()


def test_float_layers_keep_a_quantized_layer_fp32_and_exact(tmp_path):
    from lwpipe.constraints import ensure_constraint
    from lwpipe.deploy.onnx import OrtModule, build

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for m in (mlp[0], mlp[2]):
        s = m.weight.detach().abs().amax(1, keepdim=True) / 127
        ensure_constraint(m).set_quant(8, -127, 127, s, torch.zeros_like(s), 0)
    info = build(mlp.eval(), torch.randn(2, 8), tmp_path / "m.onnx", float_layers=["2"])
    assert info["layers"] == {"0": "matmul_integer"}
    ints = [t for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    levels = torch.round(mlp[0].weight / ensure_constraint(mlp[0]).scale).to(torch.int8)
    assert len(ints) == 1 and np.array_equal(onnx.numpy_helper.to_array(ints[0]), levels.T.numpy())  # no re-rounding
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = mlp(x)
    got = OrtModule(tmp_path / "m.onnx")(x)
    assert not torch.equal(got, want)  # the int8 layer quantizes its activations at run time...
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # ...to the grid's precision


def test_a_model_that_does_not_trace_is_a_one_line_error_naming_the_format(tmp_path):
    from lwpipe.deploy.onnx import build

    class ToList(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x).tolist()  # python numbers: nothing for the tracer to record

    with pytest.raises(RuntimeError, match="format=onnx: the model does not trace to ONNX") as e:
        build(ToList(), torch.randn(2, 4), tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and not (tmp_path / "m.onnx").exists()


def test_a_float_layers_glob_that_matches_no_layer_is_refused_before_any_stage(tmp_path):
    from lwpipe.errors import ConfigError

    overrides = [*TINY, "pipeline=[train,quantize,export]", "+stages.export.format=onnx"]
    with pytest.raises(ConfigError) as e:
        run_recipe([*overrides, "+stages.export.float_layers=['1','*.dense']"], tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith("stages.export.float_layers[1]='*.dense': format=onnx: matches no Linear") and "\n" not in msg
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the train stage ran


def _quantized_mlp():
    from lwpipe.constraints import ensure_constraint

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    for m in (mlp[0], mlp[2]):
        s = m.weight.detach().abs().amax(1, keepdim=True) / 127
        ensure_constraint(m).set_quant(8, -127, 127, s, torch.zeros_like(s), 0)
        m.weight.data = torch.round(m.weight.data / s) * s  # on its grid, as the quantize stage leaves it
    return mlp.eval()


def outlier_inputs(n: int) -> torch.Tensor:
    x = torch.randn(n, 16)
    x[:, 3] *= 50  # one input channel far wider than the rest, as in a transformer's hidden states
    return x


def test_smoothing_moves_an_outlier_input_channel_into_the_weights(tmp_path):
    from lwpipe.deploy.onnx import OrtModule, build

    mlp = _quantized_mlp()
    calib = [outlier_inputs(32), outlier_inputs(32)]
    plain = build(mlp, calib[0][:2], tmp_path / "a.onnx")
    smoothed = build(mlp, calib[0][:2], tmp_path / "b.onnx", smooth=(0.5, calib, lambda m, b: m(b)))
    assert "smooth_error" not in plain and set(smoothed["smooth_error"]) == {"0", "2"}
    assert all(0 < e < 0.05 for e in smoothed["smooth_error"].values())  # re-rounded: levels not the pipeline's
    graph = onnx.load(str(tmp_path / "b.onnx")).graph
    muls = [n for n in graph.node if n.name.endswith("_smooth")]
    dqls = {n.input[0] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    assert len(muls) == 2 and all(m.op_type == "Mul" and m.output[0] in dqls for m in muls)  # x / s, then int8
    x = outlier_inputs(200)
    with torch.no_grad():
        want = mlp(x)
    err_plain = (OrtModule(tmp_path / "a.onnx")(x) - want).norm() / want.norm()
    err_smooth = (OrtModule(tmp_path / "b.onnx")(x) - want).norm() / want.norm()
    assert err_smooth < 0.5 * err_plain, (err_smooth, err_plain)


def test_smooth_alpha_outside_0_1_is_refused_naming_the_key():
    from lwpipe.errors import LwpipeError

    overrides = [*TINY, "pipeline=[train,quantize,export]", "+stages.export.format=onnx"]
    with pytest.raises(LwpipeError, match=r"^stages\.export\.smooth=1\.5: Input should be less than 1"):
        validate(compose_recipe([*overrides, "+stages.export.smooth=1.5"]))


def test_sentence_encoder_smoothed_through_the_runner_records_each_layers_extra_error(files, tmp_path):
    extra = ["pipeline=[quantize,export]", "++stages.quantize.bits=8", "++stages.quantize.scheme=symmetric"]
    extra += ["++stages.export.smooth=0.5", "++stages.export.calibration_batches=2"]
    info, path, data, _ = text_run(files, "sentence_embedding", "st", "txt", tmp_path, extra)
    assert info["int8_layers"] == 12 and len(info["smooth_error"]) == 12  # the pooler is never reached
    assert all(0 <= e < 0.05 for e in info["smooth_error"].values())
    graph = onnx.load(str(path)).graph
    assert sum(n.name.endswith("_smooth") for n in graph.node) == 12
    factors = [t.name for t in graph.initializer if t.name.startswith("smooth_")]
    assert len(factors) == 8  # per layer: q, k and v read one tensor and share one s; out, up, down
    assert info["reference"] == "uncompressed" and 0.95 < info["quality"] <= 1.0
    batch = inputs(data.test.batches(8)[0])
    got = run_fresh(path, {k: v[:2, :7] for k, v in batch.items()}, tmp_path)  # still runs without lwpipe
    assert got.shape == (2, 32) and np.isfinite(got).all()
