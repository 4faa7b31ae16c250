"""model.compute_dtype: a bf16 model computes in float32 on a CPU, its weights untouched and still bf16."""

import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lwpipe import compute
from lwpipe.errors import ConfigError, LwpipeError
from tests.helpers import run_recipe
from tests.hf_helpers import make_texts, save_llama, write_txt


def tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def test_upcast_computes_a_bf16_model_in_float32_and_leaves_its_weights_bit_for_bit():
    bf16 = tiny_llama(torch.bfloat16)
    wide = copy.deepcopy(bf16).float()  # the same (bf16-representable) weights, computing in float32
    before = {n: p.clone() for n, p in bf16.named_parameters()}
    ids = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact, native = wide(input_ids=ids).logits, bf16(input_ids=ids).logits
        with compute.upcast(torch.float32):
            upcast = bf16(input_ids=ids).logits
    assert native.dtype == torch.bfloat16 and upcast.dtype == torch.float32
    # float32 arithmetic: far closer to the float32 model than bf16 arithmetic (only the embedding rows' and
    # the first norm's own rounding to bf16 remain)
    assert (upcast - exact).abs().max() < 0.5 * (native.float() - exact).abs().max()
    for n, p in bf16.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n


def test_upcast_widens_a_layer_norm_with_bf16_weights_for_a_float32_input():
    norm = nn.LayerNorm(8).to(torch.bfloat16)
    x = torch.randn(3, 8)
    with compute.upcast(torch.float32):
        y = norm(x)  # without widening: "mixed dtype (CPU): expect parameter to have scalar type of Float"
    assert y.dtype == torch.float32 and norm.weight.dtype == torch.bfloat16


def test_upcast_of_none_changes_nothing():
    lin = nn.Linear(4, 4).to(torch.bfloat16)
    with compute.upcast(None):
        assert lin(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "dtype", "device", "expected"),
    [
        ("auto", torch.bfloat16, "cpu", torch.float32),
        ("auto", torch.float16, "cpu", torch.float32),
        ("auto", torch.bfloat16, "cuda", None),  # a GPU has bf16 units
        ("auto", torch.float32, "cpu", None),  # nothing to widen
        ("native", torch.bfloat16, "cpu", None),
        ("float32", torch.bfloat16, "cuda", torch.float32),
    ],
)
def test_compute_dtype_by_setting_model_dtype_and_device(name, dtype, device, expected):
    assert compute.compute_dtype(name, nn.Linear(2, 2).to(dtype), device) == expected


def test_a_compute_dtype_that_is_not_allowed_is_named():
    with pytest.raises(ConfigError, match=r"model\.compute_dtype='bf16': allowed: auto, float32, native"):
        compute.check("bf16")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("compute")
    rows = make_texts(48)
    return {
        "bf16": save_llama(root / "bf16", torch.bfloat16),
        "train": write_txt(root / "train.txt", rows[:32]),
        "test": write_txt(root / "test.txt", rows[32:]),
    }


def args(files, *extra):
    return [
        "recipe=gpt2_causal_lm",
        "model=hf",
        f"model.path={files['bf16']}",
        f"data.train={files['train']}",
        f"data.test={files['test']}",
        "cache=false",
        "logger.console=null",
        "data.batch_size=8",
        "data.max_length=16",
        "eval.batch_size=16",
        "pipeline=[quantize]",
        "+stages.quantize={method: gptq, bits: 4, granularity: per_channel, group_size: 16, calibration_samples: 16,"
        " finetune: {epochs: 0}}",
        *extra,
    ]


@pytest.mark.slow
def test_a_bf16_run_computes_in_float32_by_default_and_natively_when_asked(files, tmp_path):
    runs = {}
    for name in ("auto", "native"):
        final, records = run_recipe(args(files, f"model.compute_dtype={name}"), tmp_path / name)
        info = json.loads((tmp_path / name / "run_info.json").read_text())
        runs[name] = (info["compute_dtype"], records[0]["quality"], final["dense_dtype"])
    assert runs["auto"][0] == "float32" and runs["native"][0] == "bfloat16"
    assert runs["auto"][2] == runs["native"][2] == "bfloat16"  # the weights stay bf16 either way
    # the same model, measured in two arithmetics: close, not equal
    assert runs["auto"][1] != runs["native"][1]
    assert runs["auto"][1] == pytest.approx(runs["native"][1], rel=0.05)


def test_a_bad_compute_dtype_is_refused_before_any_work(files, tmp_path):
    with pytest.raises(LwpipeError, match=r"model\.compute_dtype='fp32': allowed: auto, float32, native"):
        run_recipe(args(files, "model.compute_dtype=fp32"), tmp_path)
    assert not (tmp_path / "run_info.json").exists()


def test_a_large_weight_is_widened_a_block_of_rows_at_a_time_with_the_same_product(monkeypatch):
    lin = nn.Linear(16, 40).to(torch.bfloat16)
    x = torch.randn(3, 5, 16)
    monkeypatch.setattr(compute, "PIECE_BYTES", 16 * 4 * 7)  # 7 rows of the weight in float32 at a time
    assert compute.piece_rows(lin.weight, torch.float32) == 7
    pieces = []
    real = compute._widened
    monkeypatch.setattr(compute, "_widened", lambda v, d: pieces.append(v.shape) or real(v, d))
    with torch.no_grad():
        whole = F.linear(x, lin.weight.float(), lin.bias.float())
        with compute.upcast(torch.float32):
            out = lin(x)
    assert pieces == [x.shape]  # the input widened once; the weight in pieces, never whole
    assert out.dtype == torch.float32 and torch.allclose(out, whole, atol=1e-6)


def test_an_export_scores_the_model_it_was_made_from_in_the_runs_arithmetic(files, tmp_path, monkeypatch):
    """The export traces the bf16 model as it is; its agreement with the file is measured in float32 (the file
    itself, ONNX Runtime's, is not a torch call)."""
    from lwpipe.stages import export as export_stage

    seen = []
    spy = types.SimpleNamespace(upcast=lambda d: seen.append(d) or compute.upcast(d))
    monkeypatch.setattr(export_stage, "compute", spy)  # the export stage's calls only
    run_recipe(
        args(files, "pipeline=[export]", "+stages.export.format=onnx", "measure.latency=false"), tmp_path / "run"
    )
    info = json.loads((tmp_path / "run" / "export.json").read_text())["onnx"]
    assert seen == [torch.float32] and info["converted_from"] == "bfloat16"
    assert info["agreement_with_model"] >= 0.95


def test_an_onnx_files_torch_baseline_is_timed_in_the_runs_arithmetic(files, tmp_path, monkeypatch):
    """export.json's torch_fp32_latency_ms of a bf16 model: timed in float32 arithmetic, as the records time it,
    not natively in bf16 (a CPU without bf16 instructions multiplies bf16 matrices 6 times slower than float32
    ones, which made the file's speedup look that much larger)."""
    from lwpipe.deploy import onnx as onnx_form

    seen = []
    spy = types.SimpleNamespace(upcast=lambda d: seen.append(d) or compute.upcast(d))
    monkeypatch.setattr(onnx_form, "compute", spy)
    run_recipe(
        args(files, "pipeline=[export]", "+stages.export.format=onnx", "measure.batch=2", "measure.repeats=2"),
        tmp_path / "run",
    )
    info = json.loads((tmp_path / "run" / "export.json").read_text())["onnx"]
    assert seen == [torch.float32, torch.float32] and set(info["torch_fp32_latency_ms"]) == {"1", "2"}
