"""Each task's batch format, loss, metrics and distillation target, on tiny models."""

import math

import pytest
import torch
from torch import nn

from lwpipe.errors import ConfigError
from lwpipe.tasks import make_task
from lwpipe.tasks.classification import kd_loss
from tests.hf_helpers import bert_config, save_gpt2, save_sentence_model, word_tokenizer


def test_classification_metrics_carry_metric_and_quality():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    task = make_task("classification")
    out, pred = task.evaluate(model, [(x[:10], y[:10]), (x[10:], y[10:])])
    logits = model(x)
    assert out["metric"] == "accuracy" and out["quality"] == out["accuracy"]
    assert out["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert torch.equal(pred, logits.argmax(1))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2LMHeadModel

    path = save_gpt2(tmp_path_factory.mktemp("gpt2"))
    return GPT2LMHeadModel.from_pretrained(str(path)).eval(), word_tokenizer()


def test_causal_lm_perplexity_is_exp_of_the_models_own_next_token_loss(gpt2):
    model, tok = gpt2
    batch = dict(tok(["apple pear the plum and a fig", "engine wheel brake gear"], padding=True, return_tensors="pt"))
    task = make_task("causal_lm")
    out, pred = task.evaluate(model, [batch])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # transformers' own loss
    ref = model(**batch, labels=labels).loss.item()
    assert out["metric"] == "perplexity" and out["quality"] == out["perplexity"]
    assert out["loss"] == pytest.approx(ref, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert len(pred) == int(batch["attention_mask"][:, 1:].sum())  # one prediction per real next token
    assert task.loss(model, batch).item() == pytest.approx(ref, rel=1e-5)
    other, _ = task.evaluate(model, [batch], reference=pred)
    assert other["teacher_agreement"] == 1.0
    flipped, _ = task.evaluate(model, [batch], reference=(pred + 1) % len(tok))
    assert flipped["teacher_agreement"] == 0.0


def test_causal_lm_distillation_matches_next_token_distributions(gpt2):
    model, tok = gpt2
    batch = dict(tok(["apple pear the plum", "engine wheel"], padding=True, return_tensors="pt"))
    task = make_task("causal_lm")
    logits = task.forward(model, batch)
    soft_same = task.distill_loss(logits, logits, batch, 2.0, 1.0)
    assert soft_same.abs().item() < 1e-6  # identical distributions: zero KL
    assert task.distill_loss(logits, logits.flip(-1), batch, 2.0, 1.0).item() > 0.01


def test_causal_lm_refuses_an_encoder():
    from transformers import BertModel

    with pytest.raises(ConfigError, match="not a causal"):
        make_task("causal_lm").check(BertModel(bert_config(40)), None)


def test_embedding_quality_is_cosine_to_the_reference_and_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from lwpipe.models.sentence import load_sentence_transformer

    path = save_sentence_model(tmp_path / "st")
    model = load_sentence_transformer(str(path))[0]
    texts = ["apple pear the plum", "engine wheel brake gear valve"]
    from transformers import AutoTokenizer

    batch = dict(AutoTokenizer.from_pretrained(str(path))(texts, padding=True, return_tensors="pt"))
    task = make_task("embedding")
    out, emb = task.evaluate(model, [batch])
    assert out["metric"] == "cosine" and out["quality"] == 1.0 and out["accuracy"] is None
    st = SentenceTransformer(str(path), local_files_only=True, device="cpu")
    assert torch.allclose(emb, st.encode(texts, convert_to_tensor=True), atol=1e-5)  # the model's own pooling
    other = emb + torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    noisy, _ = task.evaluate(model, [batch], reference=other)
    expected = nn.functional.cosine_similarity(emb, other, dim=-1).mean().item()
    assert noisy["quality"] == noisy["cosine"] == pytest.approx(expected) and expected < 0.99
    assert task.loss(model, batch, reference=model).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_is_hintons():
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    assert torch.allclose(kd_loss(s, t, y, 2.0, 0.0), nn.functional.cross_entropy(s, y))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError, match="classification, text_classification, causal_lm, embedding"):
        make_task("segmentation")
