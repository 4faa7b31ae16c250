"""model.dtype: a bf16 checkpoint is loaded and kept in bf16 through every stage, its file and its records."""

import pytest
import torch
from safetensors import safe_open

import lwpipe
from lwpipe.checkpoint import load_state
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.models.hf import load_hf
from lwpipe.verify import artifact_mismatch
from tests.helpers import run_recipe
from tests.hf_helpers import make_texts, save_llama, write_txt

SMALL = [
    "cache=false",
    "logger.console=null",
    "data.batch_size=8",
    "data.max_length=16",
    "eval.batch_size=16",
]
PIPELINES = {
    "prune": ["pipeline=[prune]", "+stages.prune={sparsity: 0.5, finetune: {epochs: 0}}"],
    "sparsegpt": ["pipeline=[prune]", "+stages.prune={criterion: sparsegpt, sparsity: 0.5, finetune: {epochs: 0}}"],
    "share": ["pipeline=[share]", "+stages.share={bits: 4, finetune: {epochs: 0}}"],
    "rtn": ["pipeline=[quantize]", "+stages.quantize={bits: 4, granularity: per_channel, finetune: {epochs: 0}}"],
    "gptq": [
        "pipeline=[quantize]",
        "+stages.quantize={method: gptq, bits: 4, granularity: per_channel, group_size: 16, calibration_samples: 16,"
        " finetune: {epochs: 0}}",
    ],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    rows = make_texts(64)
    return {
        "bf16": save_llama(root / "bf16", torch.bfloat16),
        "fp32": save_llama(root / "fp32"),
        "train": write_txt(root / "train.txt", rows[:40]),
        "test": write_txt(root / "test.txt", rows[40:]),
    }


def args(files, model="bf16", *extra):
    return [
        "recipe=gpt2_causal_lm",
        f"model.path={files[model]}",
        f"data.train={files['train']}",
        f"data.test={files['test']}",
        *SMALL,
        *extra,
    ]


@pytest.mark.parametrize("stage", list(PIPELINES))
def test_a_bf16_checkpoint_stays_bf16_through_each_stage_its_checkpoint_file_and_records(files, tmp_path, stage):
    final, records = run_recipe(args(files, "bf16", *PIPELINES[stage]), tmp_path)
    base, end = records[0], [r for r in records if r["event"] == "stage_end"][-1]
    for r in (base, end, final):
        assert r["dense_dtype"] == "bfloat16"
        assert r["dense_bytes"] == 2 * r["params"]  # the model's own bytes, not 4 a parameter
        assert r["compression_ratio"] == pytest.approx(base["dense_bytes"] / r["compressed_bytes"])
        assert "bfloat16" in r["compression_ratio_against"]
    assert end["quality"] < 10 * base["quality"]  # the stage did not wreck the model (perplexity)
    # the artifact: every parameter bf16, computing bit for bit what the checkpoint's model computes
    loaded = lwpipe.load(tmp_path / "model.lwp")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ckpt = next((tmp_path / "checkpoints").glob("01_*.safetensors"))
    with safe_open(str(ckpt), "pt") as f:
        weights = [k for k in f.keys() if k.endswith("weight") or k.endswith("original")]
        assert weights and {f.get_tensor(k).dtype for k in weights} == {torch.bfloat16}
    restored = load_state(load_hf(str(files["bf16"]), "causal_lm")[0], ckpt)  # the stage's state, from its checkpoint
    assert artifact_mismatch(loaded, restored) is None
    batch = {"input_ids": torch.tensor([[2, 5, 7, 9]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        a, b = loaded(**batch).logits, restored(**batch).logits
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_model_dtype_float32_widens_a_bf16_checkpoint_and_bfloat16_narrows_a_float32_one(files, tmp_path):
    _, records = run_recipe(args(files, "bf16", "pipeline=[]", "model.dtype=float32"), tmp_path / "a")
    assert records[0]["dense_dtype"] == "float32" and records[0]["dense_bytes"] == 4 * records[0]["params"]
    assert {p.dtype for p in lwpipe.load(tmp_path / "a" / "model.lwp").parameters()} == {torch.float32}
    _, records = run_recipe(args(files, "fp32", "pipeline=[]", "model.dtype=bfloat16"), tmp_path / "b")
    assert records[0]["dense_dtype"] == "bfloat16"
    assert {p.dtype for p in lwpipe.load(tmp_path / "b" / "model.lwp").parameters()} == {torch.bfloat16}


def test_a_model_dtype_that_is_not_one_of_the_four_is_named(files, tmp_path):
    with pytest.raises(LwpipeError, match=r"model\.dtype='bf16': allowed: auto, float32, bfloat16, float16"):
        run_recipe(args(files, "bf16", "pipeline=[]", "model.dtype=bf16"), tmp_path)


def test_bf16_on_a_gpu_that_cannot_compute_it_is_refused_before_loading(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    for dtype in ("auto", "bfloat16"):  # auto: the checkpoint's bf16
        with pytest.raises(ConfigError, match=r"model\.dtype='bfloat16': the device Tesla T4 cannot compute"):
            load_hf(str(files["bf16"]), "causal_lm", dtype=dtype, device="cuda")[0]
    assert next(load_hf(str(files["bf16"]), "causal_lm", dtype="float32", device="cuda")[0].parameters()).dtype == (
        torch.float32
    )
    assert next(load_hf(str(files["bf16"]), "causal_lm", device="cpu")[0].parameters()).dtype == torch.bfloat16


def test_a_sentence_model_is_loaded_in_model_dtype_and_rebuilt_in_it(tmp_path):
    from lwpipe.models.sentence import from_config, load_sentence_transformer
    from tests.hf_helpers import save_sentence_model

    path = save_sentence_model(tmp_path / "st")
    model, description = load_sentence_transformer(str(path), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rebuild = {k: v for k, v in description.items() if k != "_target_"}
    assert rebuild["dtype"] == "bfloat16"
    assert {p.dtype for p in from_config(**rebuild).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_sentence_transformer(str(path))[0].parameters()} == {torch.float32}  # auto
