"""criterion: sparsegpt block by block (calibration.sequential) against one pass of the original model."""

import copy
import weakref
from types import SimpleNamespace

import pytest
import torch

from lwpipe import gptq
from lwpipe.config import CalibrationSettings
from lwpipe.constraints import compressible_layers
from lwpipe.errors import ConfigError
from lwpipe.settings import TrainSettings
from lwpipe.stages import prune_sparsegpt
from lwpipe.stages.prune import Prune, PruneConfig
from lwpipe.tasks.causal_lm import CausalLM
from tests.helpers import TINY, run_recipe
from tests.hf_helpers import make_texts, word_tokenizer


def gpt2(layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(word_tokenizer()), n_embd=32, n_layer=layers, n_head=2, n_positions=64, initializer_range=0.2
    )  # weights large enough that a block changes what the next one sees
    return GPT2LMHeadModel(cfg).eval()


def context(n=6, length=16):
    tok = word_tokenizer()
    texts = [t for t, _ in make_texts(2 * n, seed=1)]
    data = [
        dict(
            tok(texts[2 * i : 2 * i + 2], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        )
        for i in range(n)
    ]
    return SimpleNamespace(
        task=CausalLM(),
        batch_size=2,
        data=SimpleNamespace(train=data),
        stage_record={},
        calibration_batches=lambda k, batch_size=None: iter(data[:k]),
    ), data


def pruned(model, ctx, sequential=True):
    cfg = PruneConfig(
        criterion="sparsegpt",
        granularity="nm",
        keep=["embeddings", "output_head"],
        finetune=TrainSettings(epochs=0),
        calibration=CalibrationSettings(samples=12, seq_len=16, sequential=sequential),
    )
    return Prune(cfg).run(model, ctx)


def block_layers(model):
    return [(n, m) for n, m in compressible_layers(model) if n.startswith("transformer.h.")]


@torch.no_grad()
def layer_errors(dense, sparse, data):
    """Per block layer: ||(W - W') X||^2 / ||W X||^2 on the inputs X it gets in the pruned model (what SparseGPT
    minimises: a later block's inputs are those the pruned blocks before it give)."""
    layers = dict(block_layers(sparse))
    hs, _ = gptq.input_hessians(sparse, layers, data, CausalLM().forward)
    out = {}
    for n, m in layers.items():
        w = gptq.as_rows(m, dict(dense.named_modules())[n].weight)
        e = w - gptq.as_rows(m, m.weight.detach())
        out[n] = float(torch.trace(e @ hs[n] @ e.t()) / torch.trace(w @ hs[n] @ w.t()))
    return out


@pytest.mark.parametrize("sequential", [True, False])
def test_sparsegpt_gives_exact_2_4_masks_and_sequential_holds_one_blocks_hessians(monkeypatch, sequential):
    model, (ctx, _) = gpt2(), context()
    alive, most = [], []
    result, prune_layer = gptq.HessianSums.result, prune_sparsegpt.prune_layer

    def noted(sums):  # every Hessian handed out, by a weak reference: alive until the stage lets it go
        hs = result(sums)
        alive.extend((n, weakref.ref(h)) for n, h in hs.items())
        return hs

    def counted(cfg, name, *args):
        live = {n.split(".")[2] for n, r in alive if r() is not None}
        most.append((sum(r() is not None for _, r in alive), live))
        return prune_layer(cfg, name, *args)

    monkeypatch.setattr(gptq.HessianSums, "result", noted)
    monkeypatch.setattr(prune_sparsegpt, "prune_layer", counted)
    pruned(model, ctx, sequential)
    assert len(most) == 12  # 3 blocks of c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    if sequential:  # at most one block's four, all of that block
        assert max(n for n, _ in most) == 4 and all(len(blocks) == 1 for _, blocks in most)
    else:
        assert most[0] == (12, {"0", "1", "2"})
    for name, m in block_layers(model):
        w = gptq.as_rows(m, m.weight.detach())
        assert ((w != 0).view(w.shape[0], -1, 4).sum(2) == 2).all(), name
    assert model.transformer.wte.weight.count_nonzero() == model.transformer.wte.weight.numel()


def test_later_blocks_fit_the_inputs_the_pruned_blocks_before_give():
    dense, (ctx, data) = gpt2(), context()
    one_pass, sequential = pruned(copy.deepcopy(dense), ctx, False), pruned(copy.deepcopy(dense), ctx, True)
    before, after = layer_errors(dense, one_pass, data), layer_errors(dense, sequential, data)
    for block in range(3):
        one, seq = (sum(v for n, v in e.items() if n.startswith(f"transformer.h.{block}.")) for e in (before, after))
        if block == 0:  # the first block sees the model's own inputs either way
            assert seq == pytest.approx(one, rel=1e-4)
        else:
            assert seq < 0.9 * one, (block, before, after)
    # sequential=false is the one-pass method: each layer from the original model's Hessian
    layers = dict(block_layers(dense))
    hs, _ = gptq.input_hessians(dense, layers, data, CausalLM().forward)
    name = "transformer.h.2.mlp.c_fc"
    w = gptq.as_rows(layers[name], layers[name].weight)
    want, _ = gptq.sparsegpt_weight(w, hs[name], nm=(2, 4), block=128)
    have = gptq.as_rows(layers[name], dict(one_pass.named_modules())[name].weight.detach())
    assert torch.allclose(have, want, atol=1e-5)


def test_a_model_without_blocks_under_sequential_is_named(tmp_path):
    tiny = [*TINY, "pipeline=[prune]", "stages.prune.criterion=sparsegpt", "stages.prune.finetune.epochs=0"]
    with pytest.raises(ConfigError, match=r"calibration\.sequential=True: TinyMLP has no repeated blocks"):
        run_recipe(tiny, tmp_path / "a")
    final, _ = run_recipe([*tiny, "calibration.sequential=false"], tmp_path / "b")
    assert final["sparsity"] > 0.3
