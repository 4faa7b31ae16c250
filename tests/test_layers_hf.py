"""Every stage on real transformer layouts: GPT-2 (transformers' Conv1D, weight [in, out]; lm_head tied to wte),
BERT (Embedding, Linear, LayerNorm), built from tiny configs in-process (no download)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lwpipe
from lwpipe import checkpoint
from lwpipe.artifact import encode_model, read
from lwpipe.artifact.inspect import rows
from lwpipe.calibration import input_channel_norms
from lwpipe.constraints import compressible_layers, constraint, effective_tensors, is_hf_conv1d, model_spec
from lwpipe.context import Context
from lwpipe.data import DataBundle
from lwpipe.errors import ConfigError
from lwpipe.metrics import measure
from lwpipe.stages.prune import Prune, PruneConfig
from lwpipe.stages.quantize import Quantize, QuantizeConfig
from lwpipe.stages.share import Share, ShareConfig

transformers = pytest.importorskip("transformers")
VOCAB, SEQ = 101, 12
ONE_SHOT = {"finetune": {"epochs": 0}}


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert(head="classifier"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=SEQ,
        num_labels=3,
    )
    cls = transformers.BertForSequenceClassification if head == "classifier" else transformers.BertForMaskedLM
    return cls(cfg).eval()


def ctx_for(tmp_path, n=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    data = TensorDataset(ids, torch.zeros(n, dtype=torch.long))
    return Context(data=DataBundle(data, data, "tokens"), seed=0, run_dir=tmp_path, batch_size=16)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def weights(model):
    return {n: m.weight.detach() for n, m in compressible_layers(model)}


def distinct_nonzero(w):
    return torch.unique(w[w != 0]).numel()


@pytest.mark.parametrize("build", [gpt2, bert], ids=["gpt2", "bert"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_one_shot_chain_keeps_every_invariant(build, criterion, tmp_path):
    model, ctx = build(), ctx_for(tmp_path)
    Prune(PruneConfig(criterion=criterion, sparsity=0.5, **ONE_SHOT)).run(model, ctx)
    pruned = {n: w == 0 for n, w in weights(model).items()}
    for n, z in pruned.items():  # every layer kind is pruned: Embedding, Linear, Conv1D
        assert z.float().mean() == pytest.approx(0.5, abs=0.01), n
    seen = measure(model)["sparsity"]
    Share(ShareConfig(bits=3, **ONE_SHOT)).run(model, ctx)
    assert measure(model)["sparsity"] >= seen
    seen = measure(model)["sparsity"]
    Quantize(QuantizeConfig(bits=4, **ONE_SHOT)).run(model, ctx)
    assert measure(model)["sparsity"] >= seen
    kinds = set()
    for n, w in weights(model).items():
        m = dict(model.named_modules())[n]
        kinds.add("conv1d" if is_hf_conv1d(m) else "Embedding" if isinstance(m, nn.Embedding) else "Linear")
        assert (w[pruned[n]] == 0).all(), n
        assert distinct_nonzero(w) <= 2**3, n
        c = constraint(m)
        q = w / c.scale + c.zero_point
        assert (q - q.round()).abs().max() < 1e-3 and q.min() >= c.qmin - 1e-3 and q.max() <= c.qmax + 1e-3, n
    assert {"Embedding", "Linear" if build is bert else "conv1d"} <= kinds


def test_tied_weight_is_compressed_once_and_stored_once(tmp_path):
    model, ctx = gpt2(), ctx_for(tmp_path)
    names = [n for n, _ in compressible_layers(model)]
    assert "transformer.wte" in names and "lm_head" not in names  # one layer for the two modules
    for stage in (
        Prune(PruneConfig(sparsity=0.6, **ONE_SHOT)),
        Share(ShareConfig(bits=4, **ONE_SHOT)),
        Quantize(QuantizeConfig(bits=6, **ONE_SHOT)),
    ):
        stage.run(model, ctx)
    assert constraint(model.lm_head) is constraint(model.transformer.wte)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    blob = encode_model(model, None)
    header = read(blob).header
    assert header["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert [e["name"] for e in header["layers"]].count("transformer.wte.weight") == 1
    assert "lm_head.weight" not in [e["name"] for e in header["layers"]] + [t[0] for t in header["tensors"]]
    from lwpipe.artifact.inspect import format_table

    line = next(ln for ln in format_table(read(blob)).splitlines() if ln.startswith("transformer.wte.weight"))
    assert "also lm_head.weight: tied, stored once" in line
    # long transformer names widen the layer column: every row's weight count ends under the header's
    table = format_table(read(blob)).splitlines()
    end = table[0].index("weights") + len("weights")
    assert all(ln[end - 1].isdigit() and ln[end] == " " for ln in table[1:] if not ln.startswith("(")), table
    # the same model with the head untied stores the embedding twice: the tie saves about its size
    untied = gpt2()
    untied.lm_head.weight = nn.Parameter(untied.transformer.wte.weight.detach().clone())
    assert len(encode_model(untied, None)) > len(encode_model(gpt2(), None)) + 3 * VOCAB * 32


@pytest.mark.parametrize("build", [gpt2, lambda: bert("mlm"), bert], ids=["gpt2", "bert-mlm", "bert"])
def test_round_trip_is_exact_plain_by_default(build, tmp_path):
    model, ctx = build(), ctx_for(tmp_path)
    Prune(PruneConfig(sparsity=0.5, **ONE_SHOT)).run(model, ctx)
    Share(ShareConfig(bits=4, layers={"*embeddings*": {"skip": True}}, **ONE_SHOT)).run(model, ctx)
    Quantize(QuantizeConfig(bits=8, bias="float16", norms="float16", **ONE_SHOT)).run(model, ctx)
    path = tmp_path / "model.lwp"
    blob = encode_model(model, None)
    path.write_bytes(blob)
    ids = ctx.data.test.tensors[0][:8]
    plain = lwpipe.load(path, module=build())
    assert model_spec(plain) == {} and not any("parametrizations" in k for k in plain.state_dict())
    assert torch.equal(logits(plain, ids), logits(model, ids))
    tied = [
        (a, b)
        for a, b in [("lm_head", "transformer.wte"), ("cls.predictions.decoder", "bert.embeddings.word_embeddings")]
        if hasattr(model, a.split(".")[0])
    ]
    mods = dict(plain.named_modules())
    for a, b in tied:
        assert mods[a].weight is mods[b].weight  # still one tensor
    trainable = lwpipe.load(path, module=build(), constrained=True)
    assert model_spec(trainable) == model_spec(model)
    assert torch.equal(logits(trainable, ids), logits(model, ids))
    assert encode_model(trainable, None) == blob


def test_checkpoint_of_a_tied_constrained_model_loads(tmp_path):
    model, ctx = gpt2(), ctx_for(tmp_path)
    Prune(PruneConfig(sparsity=0.5, **ONE_SHOT)).run(model, ctx)
    Share(ShareConfig(bits=3, **ONE_SHOT)).run(model, ctx)
    checkpoint.save_state(model, tmp_path / "s.safetensors")
    fresh = checkpoint.load_state(gpt2(), tmp_path / "s.safetensors")
    ids = ctx.data.test.tensors[0][:4]
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    assert constraint(fresh.lm_head) is constraint(fresh.transformer.wte)


def test_conv1d_uses_its_output_axis(tmp_path):
    model, ctx = gpt2(), ctx_for(tmp_path)
    layer = model.transformer.h[0].mlp.c_fc  # Conv1D, weight [32 in, 128 out]
    Prune(PruneConfig(granularity="structured", sparsity=0.25, layers={"*wte": {"skip": True}}, **ONE_SHOT)).run(
        model, ctx
    )
    w = layer.weight.detach()
    dead_cols = (w == 0).all(0)
    assert dead_cols.sum() == 32 and not (w == 0).all(1).any()  # whole output channels (columns) go
    Quantize(QuantizeConfig(bits=4, granularity="per_channel", **ONE_SHOT)).run(model, ctx)
    c = constraint(layer)
    assert c.axis == 1 and c.scale.shape == (1, 128)
    live = ~dead_cols
    top = (w[:, live] / c.scale[:, live]).abs().amax(0)  # each output channel's largest weight is at the top level
    assert torch.allclose(top, torch.full_like(top, 7.0), atol=1e-4)
    assert constraint(model.transformer.wte).axis == 0  # embedding: one scale per token


def test_wanda_scores_weights_by_input_activation_norms(tmp_path):
    model, ctx = bert(), ctx_for(tmp_path)
    layer = model.bert.encoder.layer[0].intermediate.dense
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, 32)))
    norms, batches = input_channel_norms(model, {"x": layer}, ctx.calibration_batches(2))
    assert batches == 2
    assert torch.allclose(norms["x"], torch.cat(seen).double().norm(dim=0).float(), rtol=1e-5)
    expected = layer.weight.detach().abs() * norms["x"]
    Prune(PruneConfig(criterion="wanda", sparsity=0.5, calibration_batches=2, **ONE_SHOT)).run(model, ctx)
    kept = layer.weight.detach() != 0
    for row in range(expected.shape[0]):  # per output row: the kept scores are the top half of that row
        s = expected[row]
        assert kept[row].sum() == 16
        assert s[kept[row]].min() >= s[~kept[row]].max()
    emb = model.bert.embeddings.word_embeddings.weight.detach()  # no input activation: magnitude over the layer
    assert (emb == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_wanda_without_calibration_data_is_refused_before_work(tmp_path):
    model = bert()
    ctx = ctx_for(tmp_path)
    ctx.data = DataBundle(TensorDataset(torch.zeros(0, SEQ, dtype=torch.long), torch.zeros(0)), ctx.data.test, "e")
    with pytest.raises(ConfigError, match="stages.p.criterion='wanda': needs calibration data"):
        Prune.check_context(PruneConfig(criterion="wanda"), ctx, "stages.p")  # for the runner, before any stage
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="stages.prune.criterion=.wanda.: needs calibration data"):
        Prune(PruneConfig(criterion="wanda", **ONE_SHOT)).run(model, ctx)
    assert all(torch.equal(before[k], v) for k, v in effective_tensors(model).items() if k in before)


def test_sparsity_counts_every_parameter_and_skip_leaves_embeddings(tmp_path):
    model, ctx = bert(), ctx_for(tmp_path)
    Prune(PruneConfig(sparsity=0.9, layers={"*embeddings*": {"skip": True}}, **ONE_SHOT)).run(model, ctx)
    assert constraint(model.bert.embeddings.word_embeddings) is None
    r = measure(model)
    total = model.num_parameters()
    assert r["params"] == total
    zeros = sum(int((t == 0).sum()) for t in effective_tensors(model).values() if t.is_floating_point())
    assert r["sparsity"] == pytest.approx(zeros / total)
    emb = sum(p.numel() for p in model.bert.embeddings.parameters())
    assert r["nonzero_params"] >= emb and r["sparsity"] < 0.9 - 0.5 * emb / total  # the untouched embeddings show
    blob = encode_model(model, None)
    (tmp_path / "m.lwp").write_bytes(blob)
    from lwpipe.artifact.decode import read as read_art

    table = rows(read_art(blob))
    total_row = table[-1]
    assert total_row["kept_share"] == pytest.approx(r["nonzero_params"] / total, rel=1e-6)


def test_gpt2_params_count_the_tied_weight_once():
    model = gpt2()
    assert (
        measure(model)["params"]
        == model.num_parameters()
        == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    )
    assert np.isclose(read(encode_model(model, None)).header["dense_bytes"], 4 * model.num_parameters())


def test_wanda_on_conv1d_compares_within_each_output_column(tmp_path):
    model, ctx = gpt2(), ctx_for(tmp_path)
    layer = model.transformer.h[1].mlp.c_fc  # Conv1D: weight [32 in, 128 out]
    norms, _ = input_channel_norms(model, {"x": layer}, ctx.calibration_batches(3))
    expected = layer.weight.detach().abs() * norms["x"].view(-1, 1)  # input channels are rows here
    Prune(PruneConfig(criterion="wanda", sparsity=0.25, calibration_batches=3, **ONE_SHOT)).run(model, ctx)
    kept = layer.weight.detach() != 0
    assert (kept.sum(0) == 24).all()  # 25% of each output channel's 32 inputs go
    for col in range(128):
        s = expected[:, col]
        assert s[kept[:, col]].min() >= s[~kept[:, col]].max()


def test_lowest_mask_breaks_ties_by_position_like_a_stable_sort():
    from lwpipe.stages.prune import lowest_mask

    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (40, 7), generator=g).float()  # many equal scores
    for sparsity in (0.1, 0.5, 0.93):
        k = round(sparsity * s.numel())
        expected = torch.ones(s.numel(), dtype=torch.bool)
        expected[torch.argsort(s.flatten(), stable=True)[:k]] = False
        assert torch.equal(lowest_mask(s, sparsity), expected.view_as(s))


def test_a_shared_layer_keeps_no_dense_copy_and_its_checkpoint_stays_small(tmp_path):
    model, ctx = gpt2(), ctx_for(tmp_path)
    checkpoint.save_state(model, tmp_path / "dense.safetensors")
    Share(ShareConfig(bits=4, **ONE_SHOT)).run(model, ctx)
    original = model.transformer.wte.parametrizations.weight.original
    assert original.stride() == (0, 0) and not original.requires_grad  # one broadcast zero, frozen
    checkpoint.save_state(model, tmp_path / "shared.safetensors")
    # mask and uint8 index: 2 bytes a weight instead of 4 (+ 4 for the zeroed original without the broadcast)
    assert (tmp_path / "shared.safetensors").stat().st_size < 0.7 * (tmp_path / "dense.safetensors").stat().st_size
    fresh = checkpoint.load_state(gpt2(), tmp_path / "shared.safetensors")
    ids = ctx.data.test.tensors[0][:4]
    assert torch.equal(logits(fresh, ids), logits(model, ids))
