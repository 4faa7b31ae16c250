"""The runner keeps no model copy it will not use: no input copy without a cache, no reference for a one-shot chain."""

import pytest
import torch
from torch import nn

from lwpipe import runner
from lwpipe.config import validate
from lwpipe.models import TinyMLP
from tests.helpers import TINY, compose_recipe, run_recipe

ONE_SHOT = TINY + [
    "pipeline=[prune,share,quantize]",
    "stages.prune.finetune.epochs=0",
    "++stages.share.finetune.epochs=0",
    "++stages.quantize.finetune.epochs=0",
]


def steps(overrides):
    return validate(compose_recipe(overrides)).steps


def test_one_shot_chain_needs_no_reference():
    assert not runner.needs_reference(steps(ONE_SHOT))


@pytest.mark.parametrize(
    "extra",
    [
        ["stages.prune.finetune.epochs=1"],
        ["pipeline=[prune,share,quantize,distill]"],
        ["pipeline=[train,prune,share,quantize]"],
        ["stages.prune.criterion=taylor"],
    ],
)
def test_training_or_a_teacher_needs_the_reference(extra):
    assert runner.needs_reference(steps(ONE_SHOT + extra))


@pytest.mark.parametrize(
    "form, timing, needed",
    [("int8", True, False), ("sparse", True, False), ("[int8,onnx]", True, True), ("onnx", False, False)],
)
def test_an_export_keeps_the_uncompressed_model_only_to_time_an_onnx_file_against(form, timing, needed):
    """export.json scores every form against the reference's outputs (always kept); only the ONNX file's
    torch_fp32_latency_ms times the uncompressed model itself, and only when latency is measured."""
    s = steps(ONE_SHOT + ["pipeline=[prune,share,quantize,export]", f"++stages.export.format={form}"])
    assert runner.needs_reference(s, timing) is needed


def test_frozen_copy_computes_the_same_without_gradients():
    torch.manual_seed(0)
    m = TinyMLP()
    ref = runner.frozen_copy(m)
    x = torch.randn(5, 8)
    assert torch.equal(ref(x), m.eval()(x))
    assert not any(p.requires_grad for p in ref.parameters()) and all(p.requires_grad for p in m.parameters())


def count_clones(monkeypatch) -> list:
    calls = []

    def counting(model):
        calls.append(type(model).__name__)
        return real(model)

    real = runner.clone
    monkeypatch.setattr(runner, "clone", counting)
    return calls


@pytest.mark.slow
def test_one_shot_run_without_cache_copies_no_model(monkeypatch, tmp_path):
    calls = count_clones(monkeypatch)
    lean, _ = run_recipe(ONE_SHOT, tmp_path / "lean")
    assert calls == []
    cached = ONE_SHOT + ["cache.enabled=true", f"cache.dir={tmp_path / 'cache'}"]
    restores = count_restores(monkeypatch)
    first, _ = run_recipe(cached, tmp_path / "first")
    assert calls == []  # the input is kept on disk, not copied in memory
    assert len(restores) == 3  # one per stage looked up (a job beside it may store any), read from that file
    assert {k: first[k] for k in ("accuracy", "compressed_bytes")} == {
        k: lean[k] for k in ("accuracy", "compressed_bytes")
    }
    restores.clear()
    again, _ = run_recipe(cached, tmp_path / "second")
    assert calls == [] and len(restores) == 3  # every stage from the cache, each restored into a fresh input
    assert again["compressed_bytes"] == lean["compressed_bytes"]
    assert not list((tmp_path / "second").glob(".input*"))  # the input's file goes with the run


def count_restores(monkeypatch) -> list:
    from lwpipe.input_copy import InputCopy

    calls, real = [], InputCopy.restore

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(InputCopy, "restore", counting)
    return calls


def test_the_input_kept_on_disk_restores_equal_with_ties_and_buffers(tmp_path):
    from lwpipe.input_copy import InputCopy

    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10), nn.BatchNorm1d(10))
    m[1].weight = nn.Parameter(torch.randn(10, 4))
    m[0].weight = m[1].weight  # tied
    m.register_buffer("scratch", torch.arange(3.0), persistent=False)
    kept = InputCopy(m, tmp_path / "in.safetensors")
    assert all(t.is_meta for t in kept.skeleton.parameters())
    fresh = kept.restore()
    assert fresh[0].weight is fresh[1].weight
    want = dict(m.named_buffers()) | dict(m.named_parameters())
    got = dict(fresh.named_buffers()) | dict(fresh.named_parameters())
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        fresh[1].weight.add_(1.0)  # a copy: the input is untouched
    assert not torch.equal(fresh[1].weight, m[1].weight)
    kept.close()
    assert not (tmp_path / "in.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_floats_split_in_chunks_round_trip_exactly(dtype):
    from lwpipe.artifact.raw import CHUNK, join_float, split_float

    t = (torch.randn(2 * CHUNK + 5, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    t[:3] = torch.tensor([-0.0, float("inf"), 1e-6])
    symbols, low, mantissa = split_float(t)
    assert len(mantissa) == (t.numel() * {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype] + 7) // 8
    assert torch.equal(join_float(symbols, low, mantissa, dtype).view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("large", [False, True])
def test_only_a_large_model_trims_after_each_record(monkeypatch, tmp_path, large):
    trims = []
    monkeypatch.setattr(runner.memory, "map_large_allocations", lambda nbytes: large)
    monkeypatch.setattr(runner.memory, "release_freed_memory", lambda: trims.append(1))
    _, records = run_recipe(ONE_SHOT + ["pipeline=[train,prune]", "stages.train.epochs=2"], tmp_path)
    assert len(trims) == (len(records) if large else 0)  # epoch records too, only when large
