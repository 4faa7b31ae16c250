"""calibration: the top-level settings, their errors, and block-sequential Hessians from carried inputs."""

import json

import pytest
import torch

from lwpipe import gptq
from lwpipe.blockwise import Calibrator, limited
from lwpipe.calibration import task_forward
from lwpipe.config import CalibrationSettings, validate
from lwpipe.constraints import compressible_layers
from lwpipe.errors import ConfigError
from lwpipe.models.hf import load_hf
from lwpipe.tasks.causal_lm import CausalLM
from tests.helpers import TINY, compose_recipe, run_recipe
from tests.hf_helpers import make_texts, save_gpt2, save_llama, word_tokenizer, write_txt


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise")
    rows = make_texts(48)
    return {
        "llama": save_llama(root / "llama"),
        "gpt2": save_gpt2(root / "gpt2"),
        "train": write_txt(root / "train.txt", rows[:32]),
        "test": write_txt(root / "test.txt", rows[32:]),
    }


def batches(n=3, length=12):
    tok = word_tokenizer()
    texts = [t for t, _ in make_texts(2 * n)]
    out = []
    for i in range(n):
        enc = tok(
            texts[2 * i : 2 * i + 2], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def block_layers(model, block):
    return {n: m for n, m in compressible_layers(model) if n.startswith(block + ".") and gptq.supports(m)}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_carried_block_hessians_equal_a_whole_model_pass_after_an_earlier_block_changed(files, kind):
    model = load_hf(str(files[kind]), "causal_lm")[0]
    cal = Calibrator(model, CalibrationSettings())
    names = [n for n, _ in compressible_layers(model)]
    groups = cal.groups(names)
    blocks = [b for b, _ in cal.blocks]
    assert len(blocks) == 2 and any(all(n.startswith(blocks[1] + ".") for n in g) for g in groups)
    forward, data = task_forward(type("C", (), {"task": CausalLM()})()), batches()
    first, seen = cal.hessians(block_layers(model, blocks[0]), lambda: data, forward)
    want, _ = gptq.input_hessians(model, block_layers(model, blocks[0]), data, forward)
    assert seen == 3 and first.keys() == want.keys()
    for n in want:
        assert torch.allclose(first[n], want[n], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # "compress" block 0: the next block must see its new outputs, not the old ones
        for m in block_layers(model, blocks[0]).values():
            m.weight.mul_(0.5)
    second, _ = cal.hessians(block_layers(model, blocks[1]), lambda: data, forward)
    want, _ = gptq.input_hessians(model, block_layers(model, blocks[1]), data, forward)
    for n in want:
        assert torch.allclose(second[n], want[n], rtol=1e-4, atol=1e-5), n
    assert cal.carried is None  # after the last block nothing is kept


def test_capture_stops_the_forward_at_the_first_block(files):
    model = load_hf(str(files["llama"]), "causal_lm")[0]
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    model.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    cal = Calibrator(model, CalibrationSettings(blocks="model.layers"))
    cal.groups([n for n, _ in compressible_layers(model)])
    forward = task_forward(type("C", (), {"task": CausalLM()})())
    cal.hessians(block_layers(model, "model.layers.0"), lambda: batches(), forward)
    assert calls == [] and len(cal.carried) == 3


def test_limited_cuts_samples_and_tokens():
    out = list(limited(batches(3, 12), samples=5, seq_len=7))
    assert [b["input_ids"].shape for b in out] == [torch.Size([2, 7])] * 2 + [torch.Size([1, 7])]
    assert all(b["attention_mask"].shape == b["input_ids"].shape for b in out)


def args(files, *extra):
    return [
        "recipe=gptq_w4",
        f"model.path={files['llama']}",
        f"data.train={files['train']}",
        f"data.test={files['test']}",
        "data.batch_size=8",
        "data.max_length=16",
        "stages.quantize.group_size=16",
        *extra,
    ]


def test_calibration_settings_reach_the_stage_and_old_keys_still_win(files):
    steps = validate(compose_recipe(args(files, "calibration.samples=24", "calibration.seq_len=8"))).steps
    assert steps[0].config.calibration == CalibrationSettings(samples=24, seq_len=8)
    old = ["++stages.quantize.calibration_samples=40", "++stages.quantize.sequential=false"]
    steps = validate(compose_recipe(args(files, *old))).steps
    assert steps[0].config.calibration.samples == 40 and steps[0].config.calibration.sequential is False


def test_calibration_longer_than_the_context_is_refused_before_work(files):
    with pytest.raises(ConfigError, match=r"calibration\.seq_len=128: .* longer than the model's context of 64"):
        validate(compose_recipe(args(files, "calibration.seq_len=128", "data.max_length=128")))


def test_bad_blocks_and_no_blocks_under_sequential_are_named(files, tmp_path):
    with pytest.raises(ConfigError, match=r"calibration\.blocks='model\.nothing': .* its module lists: model\.layers"):
        run_recipe([*args(files, "calibration.blocks=model.nothing"), "calibration.samples=8"], tmp_path / "a")
    tiny = [*TINY, "pipeline=[quantize]", "++stages.quantize.method=gptq", "stages.quantize.finetune.epochs=0"]
    with pytest.raises(ConfigError, match=r"calibration\.sequential=True: TinyMLP has no repeated blocks"):
        run_recipe(tiny, tmp_path / "b")


def test_gptq_w4_with_named_blocks_runs_and_uses_the_calibration_samples(files, tmp_path):
    final, records = run_recipe(
        [*args(files, "calibration.blocks=model.layers", "calibration.samples=16"), "cache=false"], tmp_path
    )
    end = [r for r in records if r["event"] == "stage_end"][0]
    assert end["gptq_error"] and end["gptq_rounded_layers"] == []
    assert final["perplexity"] < 2 * records[0]["perplexity"]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert 10 * 2**20 < info["peak_rss_bytes"] < 2**40  # the process's peak resident memory, in bytes


def test_causal_lm_evaluation_in_row_chunks_gives_the_same_figures(files, monkeypatch):
    import lwpipe.tasks.causal_lm as clm

    model = load_hf(str(files["llama"]), "causal_lm")[0]
    data = batches(2, 12)
    whole, pred = CausalLM().evaluate(model, data)
    monkeypatch.setattr(clm, "LOGITS_ELEMENTS", 12 * model.config.vocab_size)  # one row at a time
    assert [len(c["input_ids"]) for c in clm.row_chunks(data[0], model.config.vocab_size)] == [1, 1]
    chunked, pred2 = CausalLM().evaluate(model, data)
    assert torch.equal(pred, pred2) and chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
