"""A run records the encoded size at every step and ends with model.lwp, whose size is the final record's."""

import json

import pytest
import torch

import lwpipe
from lwpipe import checkpoint
from lwpipe.errors import LwpipeError
from lwpipe.models import TinyMLP
from tests.helpers import TINY, run_recipe

FAST = TINY + [
    "logger.console=null",
    "pipeline=[train,prune,share,quantize]",
    "stages.train.epochs=2",
    "stages.prune.finetune.epochs=1",
    "stages.share.bits=2",
    "stages.share.finetune.epochs=1",
    "stages.quantize.bits=4",
    "stages.quantize.finetune.epochs=1",
]


def test_every_step_records_its_encoded_size_and_the_run_ends_with_the_file(tmp_path):
    final, records = run_recipe(FAST, tmp_path)
    steps = [r for r in records if r["event"] != "epoch"]
    assert [r["stage"] for r in steps] == ["input", "train", "prune", "share", "quantize"]
    for r in steps:
        assert r["compression_ratio"] == steps[0]["dense_bytes"] / r["compressed_bytes"]
    sizes = [r["compressed_bytes"] for r in steps]
    assert sizes[2] < sizes[1] and sizes[3] < sizes[2]  # pruning and sharing shrink the real file
    on_disk = (tmp_path / "model.lwp").stat().st_size
    assert final["compressed_bytes"] == on_disk == steps[-1]["compressed_bytes"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["compressed_bytes"] == on_disk
    assert not (tmp_path / ".encoded.lwp").exists()  # the last step's encoding became model.lwp

    loaded = lwpipe.load(tmp_path / "model.lwp")  # built from the recipe's model config (allowlisted)
    last = checkpoint.load_state(TinyMLP(), tmp_path / "checkpoints" / "04_quantize.safetensors").eval()
    x = torch.randn(32, 8)
    assert torch.equal(loaded(x), last(x))


def test_artifact_false_writes_no_file_but_still_measures(tmp_path):
    final, records = run_recipe(FAST + ["artifact=false", "pipeline=[train,prune]"], tmp_path)
    assert not (tmp_path / "model.lwp").exists()
    assert final["compressed_bytes"] > 0 and (tmp_path / "summary.json").exists()
    assert not (tmp_path / ".encoded.lwp").exists()  # the steps' encodings are removed with the run


def test_a_failed_run_leaves_no_encoding_behind(tmp_path, monkeypatch):
    from lwpipe.runner import Run

    real, seen = Run.execute, []

    def execute(self, step, s, model):  # the third stage fails, after two stage_end records were encoded
        seen.append(self.encoded_file.is_file())
        if step == 3:
            raise LwpipeError("stage share failed")
        return real(self, step, s, model)

    monkeypatch.setattr(Run, "execute", execute)
    with pytest.raises(LwpipeError, match="share failed"):
        run_recipe(FAST, tmp_path)
    assert seen == [False, True, True]  # the encoding was on disk while the run went on
    assert not (tmp_path / ".encoded.lwp").exists() and not (tmp_path / "model.lwp").exists()
