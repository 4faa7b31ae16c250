"""Model sources (model=hf, model=sentence_transformer), text data, and what model.lwp may rebuild."""

import json

import pytest
import torch

import lwpipe
from lwpipe.artifact import encode_model
from lwpipe.artifact.format import ArtifactError
from lwpipe.data.text import load_text
from lwpipe.errors import ConfigError
from lwpipe.models.hf import from_config, load_hf
from lwpipe.models.sentence import load_sentence_transformer
from tests.hf_helpers import make_texts, save_bert, save_gpt2, save_sentence_model, write_csv, write_txt


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_bert(tmp_path_factory.mktemp("bert"))


def test_the_task_picks_the_auto_class_and_the_rebuild_description_is_json(bert):
    (clf, rebuild), (enc, _) = load_hf(str(bert), "text_classification"), load_hf(str(bert), "embedding")
    assert type(clf).__name__ == "BertForSequenceClassification" and type(enc).__name__ == "BertModel"
    assert not hasattr(clf, "lwpipe_rebuild")  # the description travels beside the model, not on it
    desc = json.loads(json.dumps(rebuild))
    assert desc["_target_"] == "lwpipe.models.hf.from_config"
    assert desc["auto_class"] == "AutoModelForSequenceClassification" and desc["config"]["model_type"] == "bert"


def test_model_lwp_rebuilds_without_the_directory(bert, tmp_path):
    model, rebuild = load_hf(str(bert))
    path = tmp_path / "model.lwp"
    path.write_bytes(encode_model(model, rebuild))
    loaded = lwpipe.load(path)
    x = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


def test_tied_gpt2_rebuilds_from_its_config(tmp_path):
    """lm_head.weight is stored once, under transformer.wte.weight: the rebuilt model has both names."""
    model, rebuild = load_hf(str(save_gpt2(tmp_path / "gpt2", tied=True)), "causal_lm")
    path = tmp_path / "model.lwp"
    path.write_bytes(encode_model(model.eval(), rebuild))
    loaded = lwpipe.load(path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    from lwpipe.artifact.inspect import describe

    line = describe(str(path)).splitlines()[1]  # the model line names the config's type, not its ~40 keys
    assert "'model_type': 'gpt2'" in line and "keys}" in line and len(line) < 200, line
    x = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"auto_class": "builtins.eval"}, "auto_class 'builtins.eval' is not one of"),
        ({"config": {"model_type": "os.system"}}, "model_type 'os.system' is not a transformers model type"),
    ],
)
def test_from_config_builds_only_transformers_classes(bert, tmp_path, change, message):
    model, rebuild = load_hf(str(bert))
    desc = {**rebuild, **change}
    path = tmp_path / "model.lwp"
    path.write_bytes(encode_model(model, desc))
    with pytest.raises(ArtifactError, match=message):
        lwpipe.load(path)
    with pytest.raises(Exception, match=message):
        from_config(**{k: v for k, v in desc.items() if k != "_target_"})


def test_sentence_directory_errors(tmp_path):
    path = save_sentence_model(tmp_path / "st")
    (path / "modules.json").rename(path / "modules.bak")
    with pytest.raises(ConfigError, match=r"model.path=.*modules.json is missing"):
        load_sentence_transformer(str(path))[0]
    (path / "modules.bak").rename(path / "modules.json")
    (path / "1_Pooling" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"1_Pooling/config.json is missing"):
        load_sentence_transformer(str(path))[0]
    with pytest.raises(ConfigError, match="use task=embedding"):
        load_sentence_transformer(str(path), task="causal_lm")[0]


def test_text_files_are_tokenized_with_the_models_tokenizer(bert, tmp_path):
    rows = make_texts(10)
    write_csv(tmp_path / "a.csv", rows[:6], text="sentence", label="y")
    write_csv(tmp_path / "b.csv", rows[6:], text="sentence", label="y")
    data = load_text(
        str(tmp_path / "a.csv"),
        str(tmp_path / "b.csv"),
        str(bert),
        text_column="sentence",
        label_column="y",
        max_length=5,
    )
    t = data.train.tensors
    assert t["input_ids"].shape == (6, 5) and t["labels"].tolist() == [r[1] for r in rows[:6]]  # truncated to 5
    assert data.test.batches(3)[1]["labels"].tolist() == [r[1] for r in rows[9:]]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": s, "label": ["neg", "pos"][y]}) for s, y in rows[:6])
    )
    js = load_text(str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl"), str(bert))
    assert js.train.tensors["labels"].tolist() == [r[1] for r in rows[:6]]  # names numbered in sorted order
    write_txt(tmp_path / "a.txt", rows[:6])
    write_txt(tmp_path / "b.txt", rows[:5] + [("apple apple", 0)])
    a = load_text(str(tmp_path / "a.txt"), str(tmp_path / "a.txt"), str(bert), task="causal_lm")
    b = load_text(str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(bert), task="causal_lm")
    assert "labels" not in a.train.tensors and a.identity != b.identity  # the cache key sees the text


def test_builtin_corpus_is_real_english_and_seeded(bert):
    a = load_text(tokenizer=str(bert), task="embedding", limit_train=50, limit_test=10)
    b = load_text(tokenizer=str(bert), task="embedding", limit_train=50, limit_test=10)
    assert a.name == "pydoc_topics" and a.identity == b.identity
    assert torch.equal(a.train.tensors["input_ids"], b.train.tensors["input_ids"])


def test_custom_recipe_groups_carry_no_lenet_keys():
    from tests.helpers import compose_recipe

    cfg = compose_recipe(["model=custom", "model._target_=x.build", "data=custom", "data._target_=x.data"])
    assert set(cfg.model) == {"_target_", "checkpoint"} and set(cfg.data) == {"_target_", "batch_size"}
    assert dict(cfg.stages.prune.layers) == {}  # the default recipe's fc3 setting comes with LeNet-300 only
    assert "fc3" in compose_recipe([]).stages.prune.layers


def test_objective_accepts_the_task_metrics():
    from lwpipe.config import validate
    from tests.helpers import compose_recipe

    r = validate(compose_recipe(["task=causal_lm", "model=hf", "model.path=x", "data=text", "objective=[perplexity]"]))
    assert r.top.objective == ["perplexity"] and r.top.task.name == "causal_lm"
