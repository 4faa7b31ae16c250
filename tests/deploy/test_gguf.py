"""format: gguf: llama.cpp's file from the quantize stage's levels, read back by gguf.GGUFReader."""

import json

import numpy as np
import pytest
import torch

import lwpipe
from lwpipe.deploy.gguf import permute
from lwpipe.deploy.levels import layer_grid
from lwpipe.errors import ConfigError
from tests.deploy.conftest import bert_args, lm_args
from tests.helpers import run_recipe
from tests.hf_helpers import bpe_tokenizer, save_llama

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow


def read(path):
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = (t.tensor_type.name, torch.tensor(np.array(data, dtype=np.float32)))
    return reader, out


@pytest.mark.parametrize(
    ("model", "gguf_type", "group"), [("llama", "q4_0", 32), ("gpt2", "q4_0", None), ("llama", "q8_0", None)]
)
def test_gguf_blocks_hold_the_pipelines_levels_and_read_back_equal(lm_files, tmp_path, model, gguf_type, group):
    bits = 4 if gguf_type == "q4_0" else 8
    extra = ["++stages.export.format=gguf", f"++stages.export.gguf_type={gguf_type}", f"stages.quantize.bits={bits}"]
    per_channel = ["stages.quantize.group_size=null", "stages.quantize.clip_search=false"]
    extra += [f"stages.quantize.group_size={group}"] if group else per_channel
    run_recipe(lm_args(lm_files, model, *extra), tmp_path)
    info = json.loads((tmp_path / "export.json").read_text())["gguf"]
    assert (tmp_path / "export" / "model.gguf").stat().st_size == info["bytes"]
    reader, tensors = read(tmp_path / "export" / "model.gguf")
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == model
    assert "token_embd.weight" in tensors and "blk.1.attn_norm.weight" in tensors
    kept = {n: e for n, e in info["layers"].items() if e["levels"] == "kept"}
    assert kept and all(e["type"] == gguf_type.upper() for e in kept.values())
    assert all(e["rel_error"] < 2e-3 for e in kept.values())  # the block scale's float16 rounding only
    loaded = lwpipe.load(tmp_path / "model.lwp", constrained=True)
    modules, heads = dict(loaded.named_modules()), {"q_proj": loaded.config.num_attention_heads}
    heads["k_proj"] = getattr(loaded.config, "num_key_value_heads", None)
    for name, entry in kept.items():
        _, levels, scale, _ = layer_grid(modules[entry["hf_name"].removesuffix(".weight")])
        expected = levels * scale.half().float()  # the pipeline's own levels on the block's float16 scale
        proj = entry["hf_name"].split(".")[-2]
        if model == "llama" and proj in heads:
            expected = permute(expected, heads[proj])
        assert torch.equal(tensors[name][1].reshape(expected.shape), expected), name
    assert field(reader, "tokenizer.ggml.model") == info["tokenizer"] == "none"  # a word-level tokenizer
    assert info["check"]["exact"] and info["check"]["tensors"] == len(reader.tensors)  # the run's own read-back
    assert info["check"]["metadata"][f"{model}.block_count"] == 2


def field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else bytes(f.parts[-1]).decode()


def strings(reader, key: str) -> list[str]:
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode() for i in f.data]


@pytest.mark.parametrize(("style", "kind"), [("byte_level", "gpt2"), ("sentencepiece", "llama")])
def test_gguf_carries_the_tokenizer_as_llama_cpp_reads_it(lm_files, tmp_path, style, kind):
    """Byte-level BPE with its merges (llama.cpp refuses a gpt2 vocabulary without them); sentencepiece-style
    BPE as llama's scored vocabulary, byte tokens typed BYTE."""
    tok = bpe_tokenizer(style)
    files = {**lm_files, "llama": save_llama(tmp_path / "model", tokenizer=tok)}
    extra = ["++stages.export.format=gguf", "++stages.export.gguf_type=q8_0", "stages.quantize.bits=8"]
    run_recipe(lm_args(files, "llama", *extra), tmp_path / "run")
    reader = gguf.GGUFReader(str(tmp_path / "run" / "export" / "model.gguf"))
    assert field(reader, "tokenizer.ggml.model") == kind
    tokens = strings(reader, "tokenizer.ggml.tokens")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert len(tokens) == len(tok) and all(tokens[i] == t for i, t in by_id.items())
    if kind == "gpt2":
        assert len(strings(reader, "tokenizer.ggml.merges")) > 10
    else:
        types = reader.fields["tokenizer.ggml.token_type"]
        byte = [int(types.parts[i][0]) for i in types.data][tok.convert_tokens_to_ids("<0x41>")]
        assert byte == gguf.TokenType.BYTE and "tokenizer.ggml.scores" in reader.fields


def test_gguf_read_back_equals_what_was_written(tmp_path):
    from lwpipe.deploy.gguf import blocks

    rng = np.random.default_rng(0)
    levels = rng.integers(-8, 8, size=(4, 64))
    scale = np.repeat(rng.random((4, 2)).astype(np.float16).astype(np.float32), 32, axis=1)
    for kind in ("q4_0", "q8_0"):
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        data = blocks(levels, scale, kind)
        back = gguf.quants.dequantize(data, qtype).reshape(4, 64)
        np.testing.assert_array_equal(back, levels * scale)


def test_gguf_of_a_bert_is_refused_before_any_stage(lm_files, tmp_path):
    args = bert_args(lm_files, "++stages.export.format=gguf")
    with pytest.raises(ConfigError, match="gguf"):
        run_recipe(args, tmp_path)
    assert not (tmp_path / "export").exists()


def test_q4_0_of_groups_not_blocks_needs_requantize(lm_files, tmp_path):
    extra = ["++stages.export.format=gguf", "++stages.export.gguf_type=q4_0", "stages.quantize.group_size=16"]
    with pytest.raises(ConfigError, match="requantize"):
        run_recipe(lm_args(lm_files, "llama", *extra), tmp_path / "refused")
    run_recipe(lm_args(lm_files, "llama", *extra, "++stages.export.requantize=true"), tmp_path)
    layers = json.loads((tmp_path / "export.json").read_text())["gguf"]["layers"]
    requantized = [e for e in layers.values() if e["levels"] == "requantized"]
    assert requantized and all(0 < e["rel_error"] < 0.2 for e in requantized)


def test_a_cached_run_writes_export_again(lm_files, tmp_path):
    """quantize replays from the stage cache; export with a deployable form is computed afresh, so the
    second run directory has its own export/ (the cache restores files, not folders)."""
    extra = ["++stages.export.format=gguf", f"cache.dir={tmp_path / 'cache'}"]
    run_recipe(lm_args(lm_files, "llama", *extra, "stages.quantize.group_size=32"), tmp_path / "first")
    _, records = run_recipe(lm_args(lm_files, "llama", *extra, "stages.quantize.group_size=32"), tmp_path / "again")
    ends = {r["stage"]: r.get("cached") for r in records if r.get("event") == "stage_end"}
    assert ends == {"quantize": True, "export": False}
    first, again = (tmp_path / d / "export" / "model.gguf" for d in ("first", "again"))
    assert again.read_bytes() == first.read_bytes()


def test_one_run_writes_compressed_tensors_and_gguf_side_by_side(lm_files, tmp_path):
    pytest.importorskip("compressed_tensors")
    extra = ["++stages.export.format=[compressed_tensors,gguf]", "stages.quantize.group_size=32"]
    run_recipe(lm_args(lm_files, "llama", *extra), tmp_path)
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["gguf"]["gguf_type"] == "q8_0" and info["compressed_tensors"]["quantization_format"] == "pack-quantized"
    assert (tmp_path / "export" / "model.gguf").is_file()
    assert (tmp_path / "export" / "compressed_tensors" / "model.safetensors").is_file()
