"""quantize `layers: {TABLE: {frequency_prior: p}}`: a token-embedding table's step per row by how often data.train
uses the token (lwpipe/frequency.py)."""

import re

import pytest
import torch
from torch import nn

from lwpipe import frequency
from lwpipe.constraints import constraint
from lwpipe.context import Context
from lwpipe.data.bundle import DataBundle
from lwpipe.data.text import DictDataset
from lwpipe.errors import ConfigError
from lwpipe.stages.quantize import Quantize, QuantizeConfig

ROWS, DIM = 40, 32


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(ROWS, DIM)
        self.dense = nn.Linear(DIM, 8)

    def forward(self, input_ids):
        return self.dense(self.word_embeddings(input_ids).mean(1))


def texts(seed: int = 0) -> DictDataset:
    """Ids drawn with a skewed frequency from the first half of the table (the rest never occurs), padded with
    id ROWS - 1 where attention_mask is 0: padding must not count as a use."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, ROWS // 2 + 1).float()
    ids = torch.multinomial(weights, 64 * 12, replacement=True, generator=g).reshape(64, 12)
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    ids[:, 9:] = ROWS - 1
    return DictDataset({"input_ids": ids, "attention_mask": mask})


def text_ctx(tmp_path) -> Context:
    data = texts()
    return Context(data=DataBundle(train=data, test=data, name="ids"), seed=0, run_dir=tmp_path)


def test_steps_keep_the_frequency_weighted_error_of_the_plain_step():
    counts = torch.tensor([0.0, 0, 1, 3, 10, 200])
    for prior in (0.5, 1.0, 4.0):
        steps = frequency.frequency_steps(counts, 0.8, prior).reshape(-1)
        w = counts + prior
        assert float((w * steps**2).sum() / w.sum()) == pytest.approx(0.8**2, rel=1e-5)
        assert torch.all(steps[1:] <= steps[:-1])  # the more a token is used, the finer its row
        assert steps[0] == steps[1] > 0.8 > steps[-1]
    # a larger prior moves every row towards the plain step
    spread = [float(frequency.frequency_steps(counts, 0.8, p).log().std()) for p in (0.5, 4.0, 100.0)]
    assert spread[0] > spread[1] > spread[2]


def test_counts_leave_padding_out_and_refuse_ids_beyond_the_table():
    data = texts()
    counts = frequency.token_counts(data, ROWS, "k")
    assert counts.sum() == data.tensors["attention_mask"].sum() and counts[ROWS - 1] == 0
    assert torch.equal(counts[: ROWS // 2], torch.bincount(data.tensors["input_ids"][:, :9].reshape(-1), minlength=20))
    top = int(data.tensors["input_ids"][:, :9].max())  # the padding id beyond it is not a use
    with pytest.raises(ConfigError, match=rf"^k=.set.: data.train has token ids up to {top}, and the table has 10"):
        frequency.token_counts(data, 10, "k")
    with pytest.raises(ConfigError, match=r"needs tokenized text in data.train \(input_ids\)"):
        frequency.token_counts(torch.utils.data.TensorDataset(torch.zeros(3, 2)), ROWS, "k")


def test_the_stage_gives_each_row_its_step_and_records_them(tmp_path):
    torch.manual_seed(0)
    model, ctx = Encoder(), text_ctx(tmp_path)
    w, wd = model.word_embeddings.weight.detach().clone(), model.dense.weight.detach().clone()
    cfg = QuantizeConfig(
        bits=12, step=0.35, granularity="per_channel", layers={"*embeddings": {"step": 0.8, "frequency_prior": 1.0}}
    )
    Quantize.check_model(cfg, model, "stages.quantize")
    Quantize(cfg).run(model, ctx)
    counts = frequency.token_counts(ctx.data.train, ROWS, "k")
    c = constraint(model.word_embeddings)
    rows_step = c.scale.reshape(-1) / w.std(1, unbiased=False)
    assert torch.allclose(rows_step, frequency.frequency_steps(counts, 0.8, 1.0).reshape(-1), rtol=1e-4)
    unseen, seen = rows_step[counts == 0], rows_step[counts > 0]
    assert unseen.min() > 0.8 and seen.min() < 0.8  # the unused rows coarser, the most used finer
    q = model.word_embeddings.weight.detach() / c.scale
    assert (q - q.round()).abs().max() < 1e-3  # still integer levels: model.lwp entropy-codes them as before
    dense = constraint(model.dense).scale.reshape(-1) / wd.std(1, unbiased=False)
    assert torch.allclose(dense, torch.full_like(dense, 0.35), rtol=1e-4)  # other layers keep the plain step
    rec = ctx.stage_record["frequency_steps"]["word_embeddings"]
    assert rec["rows"] == ROWS and rec["rows_seen"] == int((counts > 0).sum())
    assert rec["step_unseen"] == pytest.approx(float(unseen.max()), rel=1e-4)


@pytest.mark.parametrize(
    ("layers", "granularity", "step", "message"),
    [
        ({"dense": {"step": 0.5, "frequency_prior": 1.0}}, "per_channel", None, "layer dense is a Linear"),
        ({"*embeddings": {"frequency_prior": 1.0}}, "per_channel", None, "it needs a step and granularity"),
        ({"*embeddings": {"step": 0.8, "frequency_prior": 1.0}}, "per_tensor", None, "granularity=per_tensor"),
    ],
)
def test_a_table_it_cannot_take_is_refused_before_any_work(layers, granularity, step, message):
    cfg = QuantizeConfig(bits=12, step=step, granularity=granularity, layers=layers)
    key = re.escape(f"stages.quantize.layers.{next(iter(layers))}.frequency_prior")
    with pytest.raises(ConfigError, match=f"^{key}"):
        Quantize.check_model(cfg, Encoder(), "stages.quantize")
    with pytest.raises(ConfigError, match=message):
        Quantize.check_model(cfg, Encoder(), "stages.quantize")


@pytest.mark.parametrize("bad", [0, -1.0, 1e10])
def test_the_prior_is_bounded(bad):
    with pytest.raises(ValueError, match="frequency_prior"):
        QuantizeConfig(step=0.5, granularity="per_channel", layers={"*embeddings": {"frequency_prior": bad}})


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_a_narrow_grid_raises_the_finest_steps_instead_of_clipping_their_rows(scheme, tmp_path):
    torch.manual_seed(0)
    model, ctx = Encoder(), text_ctx(tmp_path)
    w = model.word_embeddings.weight.detach().clone()
    layers = {"*embeddings": {"step": 0.8, "frequency_prior": 0.1}}  # the most used rows: steps ~0.15 std
    cfg = QuantizeConfig(bits=4, step=0.35, scheme=scheme, granularity="per_channel", layers=layers)
    Quantize(cfg).run(model, ctx)
    c = constraint(model.word_embeddings)
    wanted = frequency.frequency_steps(frequency.token_counts(ctx.data.train, ROWS, "k"), 0.8, 0.1).reshape(-1)
    got = c.scale.reshape(-1) / w.std(1, unbiased=False)
    raised = got > wanted * (1 + 1e-4)
    assert raised.any() and (~raised).any() and torch.allclose(got[~raised], wanted[~raised], rtol=1e-4)
    err = (model.word_embeddings.weight.detach() - w).abs() / c.scale
    assert err.max() <= 0.5 + 1e-3  # every weight within half a step: nothing clipped at the 4-bit grid's edge


def test_the_stage_declares_that_it_reads_the_training_texts():
    table = {"*embeddings": {"step": 0.8, "frequency_prior": 1.0}}
    assert Quantize.needs_calibration_with(QuantizeConfig(step=0.35, granularity="per_channel", layers=table))
    assert not Quantize.needs_calibration_with(QuantizeConfig(step=0.35, granularity="per_channel"))
