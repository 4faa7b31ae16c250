"""The run reads its deployable outputs back as their runtimes do: a compressed_tensors directory that does not
load or holds other weights, a GGUF file with a wrong block or tokenizer model fails the run (no summary.json)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lwpipe.errors import LwpipeError
from tests.deploy.conftest import bert_args, lm_args
from tests.helpers import run_recipe

pytest.importorskip("gguf")
pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.slow
GGUF = ["++stages.export.format=gguf", "++stages.export.gguf_type=q4_0", "stages.quantize.group_size=32"]
CT = ["++stages.export.format=compressed_tensors", "stages.quantize.group_size=32"]


def failed_run(args, run_dir, match):
    with pytest.raises(LwpipeError, match=match) as e:
        run_recipe(args, run_dir)
    assert "\n" not in str(e.value) and str(e.value).endswith("so the run failed")
    assert not (run_dir / "summary.json").exists()
    return json.loads((run_dir / "export.json").read_text())  # what the check found is recorded


def test_good_outputs_pass_and_are_recorded(lm_files, tmp_path):
    run_recipe(lm_args(lm_files, "llama", "++stages.export.format=[compressed_tensors,gguf]"), tmp_path)
    info = json.loads((tmp_path / "export.json").read_text())
    ct, gg = info["compressed_tensors"]["check"], info["gguf"]["check"]
    assert ct["loads"] and ct["weights_exact"] and ct["max_rel_diff"] <= 1e-4
    assert ct["loader"] == "transformers.AutoModelForCausalLM.from_pretrained"
    assert gg["loads"] and gg["exact"] and gg["tensors"] == len(info["gguf"]["layers"])
    assert gg["metadata"] == {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.embedding_length": 32,
        "llama.attention.head_count": 4,
        "tokenizer.ggml.model": "none",
    }
    assert (tmp_path / "summary.json").exists()


def test_a_bert_classifier_loads_with_its_tasks_auto_class(lm_files, tmp_path):
    run_recipe(bert_args(lm_files, *CT, "stages.quantize.bits=8"), tmp_path)
    check = json.loads((tmp_path / "export.json").read_text())["compressed_tensors"]["check"]
    assert check["loader"] == "transformers.AutoModelForSequenceClassification.from_pretrained"
    assert check["weights_exact"] and check["max_rel_diff"] <= 1e-4


def test_a_gguf_block_with_another_scale_fails_the_run(lm_files, tmp_path, monkeypatch):
    import lwpipe.deploy.gguf as writer

    blocks, calls = writer.blocks, []

    def one_scale_flipped(levels, scale, gguf_type):
        data = blocks(levels, scale, gguf_type)
        if not calls:  # the first quantized tensor's first block: its float16 scale's lowest bit
            data[0, 0] ^= 1
        calls.append(1)
        return data

    monkeypatch.setattr(writer, "blocks", one_scale_flipped)
    info = failed_run(
        lm_args(lm_files, "llama", *GGUF),
        tmp_path,
        r"the run's own export/model\.gguf tensor blk\.0\.\w+\.weight \(model\.layers\.0\.\S+\.weight\) "
        r"reads back other values than written",
    )
    assert info["gguf"]["check"]["loads"] and "exact" not in info["gguf"]["check"]


def test_a_gguf_with_a_wrong_tokenizer_model_fails_the_run(lm_files, tmp_path, monkeypatch):
    import lwpipe.deploy.gguf as writer

    def wrong_vocab(gguf_writer, tok, c):
        gguf_writer.add_tokenizer_model("gpt2")  # a word-level tokenizer is not a byte-level BPE
        return "gpt2"

    monkeypatch.setattr(writer, "write_vocab", wrong_vocab)
    failed_run(
        lm_args(lm_files, "llama", *GGUF),
        tmp_path,
        r"export/model\.gguf has metadata tokenizer\.ggml\.model='gpt2', not 'none'",
    )


def test_a_compressed_tensors_scale_other_than_the_pipelines_fails_the_run(lm_files, tmp_path, monkeypatch):
    import lwpipe.deploy.compressed_tensors as writer

    grids = writer.grids

    def one_scale_changed(model):
        found = grids(model)
        _, scale, _ = found["model.layers.1.mlp.up_proj"]
        scale.view(-1)[0] *= 1.5
        return found

    monkeypatch.setattr(writer, "grids", one_scale_changed)
    info = failed_run(
        lm_args(lm_files, "llama", *CT),
        tmp_path,
        r"export/compressed_tensors/ loads in transformers with other weights than the pipeline's: "
        r"tensor model\.layers\.1\.mlp\.up_proj\.weight differs",
    )
    check = info["compressed_tensors"]["check"]
    assert check["loads"] and not check["weights_exact"] and check["max_rel_diff"] > 0


CUT_SAFETENSORS = """
import sys
import lwpipe.deploy.compressed_tensors as ct
write = ct.write
def cut(model, ctx, cfg, out):
    info = write(model, ctx, cfg, out)
    f = out / "compressed_tensors" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])  # transformers cannot read it
    return info
ct.write = cut
from lwpipe.cli import main
sys.argv = ["lwpipe", *sys.argv[1:]]
main()
"""


def test_a_compressed_tensors_directory_that_does_not_load_fails_the_cli_run(lm_files, tmp_path):
    run_dir = tmp_path / "run"
    args = [*lm_args(lm_files, "llama", *CT), "cache=false", "measure.latency=false", f"hydra.run.dir={run_dir}"]
    p = subprocess.run(
        [sys.executable, "-c", CUT_SAFETENSORS, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr
    assert (
        "the run's own export/compressed_tensors/ does not load with "
        "transformers.AutoModelForCausalLM.from_pretrained" in p.stderr
    ), p.stderr
    assert "so the run failed" in p.stderr and "Traceback" not in p.stderr
    assert (run_dir / "FAILED").exists() and not (run_dir / "summary.json").exists()
    assert json.loads((run_dir / "export.json").read_text())["compressed_tensors"]["check"]["loads"] is False


def test_gguf_metadata_fields_read_as_values(lm_files, tmp_path):
    """check.field reads strings and integers as GGUFReader stores them."""
    import gguf

    from lwpipe.deploy.check import field

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(3)
    w.add_tokenizer_model("llama")
    w.add_tensor("t", np.zeros((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "llama.block_count") == 3 and field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "general.architecture") == "llama" and field(reader, "no.such.key") is None
