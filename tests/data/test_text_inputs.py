"""Hostile and broken text inputs for data=text: bad labels, huge examples, tokenizer-less model directories."""

import csv
import json
import logging

import pytest

from lwpipe.data import text
from lwpipe.data.text import load_text
from lwpipe.errors import ConfigError
from tests.hf_helpers import bert_tokenizer, make_texts, word_tokenizer


def write_rows(path, labels):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for (t, _), label in zip(make_texts(len(labels)), labels):
            w.writerow([t, label])
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bert"
    bert_tokenizer().save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize(
    "bad, shown",
    [("", "''"), ("nan", "'nan'"), ("1.5", "'1.5'"), ("inf", "'inf'"), ("-inf", "'-inf'"), ("cat", "'cat'")],
)
def test_a_bad_csv_label_is_named_with_its_row(tmp_path, bert_dir, bad, shown):
    train = write_rows(tmp_path / "train.csv", ["0", "1", "0", bad, "1"])
    test = write_rows(tmp_path / "test.csv", ["0", "1"])
    with pytest.raises(ConfigError) as e:
        load_text(train, test, bert_dir)
    msg = str(e.value)
    assert msg.startswith(f"data.label_column={shown}: row 4 of data.train"), msg
    assert "outside" not in msg


def test_a_bad_label_in_the_test_file_names_that_file(tmp_path, bert_dir):
    train = write_rows(tmp_path / "train.csv", ["0", "1"])
    test = write_rows(tmp_path / "test.csv", ["1", "0", "0.5"])
    with pytest.raises(ConfigError, match=r"data.label_column='0.5': row 3 of data.test: not a whole number"):
        load_text(train, test, bert_dir)


def test_jsonl_labels_whole_floats_pass_fractions_do_not(tmp_path, bert_dir):
    def jsonl(name, labels):
        rows = [{"text": t, "label": v} for (t, _), v in zip(make_texts(len(labels)), labels)]
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
        return str(tmp_path / name)

    d = load_text(jsonl("a.jsonl", [0, 1.0, 1]), jsonl("b.jsonl", [1, 0]), bert_dir)
    assert d.train.tensors["labels"].tolist() == [0, 1, 1]
    with pytest.raises(ConfigError, match=r"data.label_column=None: row 2 of data.train has no label"):
        load_text(jsonl("c.jsonl", [0, None]), jsonl("d.jsonl", [1, 0]), bert_dir)


def test_names_are_still_numbered_in_sorted_order(tmp_path, bert_dir):
    d = load_text(
        write_rows(tmp_path / "a.csv", ["pos", "neg", "pos"]), write_rows(tmp_path / "b.csv", ["neg"]), bert_dir
    )
    assert d.train.tensors["labels"].tolist() == [1, 0, 1] and d.test.tensors["labels"].tolist() == [0]


def test_a_huge_one_line_text_is_clipped_before_tokenizing(tmp_path, monkeypatch, caplog, bert_dir):
    (tmp_path / "train.txt").write_text("apple pear " * 40_000 + "\nplum fig\n")  # one 440,000-character line
    (tmp_path / "test.txt").write_text("apple pear\n")
    seen = []
    encode = text.encode

    def spy(tok, pairs, *a, **kw):
        seen.extend(len(t) for t, _ in pairs)
        return encode(tok, pairs, *a, **kw)

    monkeypatch.setattr(text, "encode", spy)
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        d = load_text(
            str(tmp_path / "train.txt"), str(tmp_path / "test.txt"), bert_dir, task="causal_lm", max_length=16
        )
    assert max(seen) == 1024  # what reached the tokenizer: 16 tokens x 64 characters
    assert "data.train: 1 text(s) longer than 1,024 characters (row 1: 440,000)" in caplog.text
    assert d.train.tensors["input_ids"].shape == (2, 16)  # what max_length keeps is unchanged


def test_a_csv_field_beyond_the_csv_limit_is_one_error(tmp_path, bert_dir):
    (tmp_path / "train.csv").write_text("text,label\n" + "a" * 200_000 + ",0\n")
    test = write_rows(tmp_path / "test.csv", ["0"])
    with pytest.raises(ConfigError, match=r"data.train=.*line \d+ is not CSV that can be read: field larger"):
        load_text(str(tmp_path / "train.csv"), test, bert_dir)


def test_a_directory_without_tokenizer_files_is_refused_by_name(tmp_path):
    """transformers builds a one-token tokenizer from a GPT-2 config alone: every text becomes no tokens."""
    from transformers import GPT2Tokenizer

    empty = tmp_path / "gpt2"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "a.txt").write_text("apple pear plum\n")
    tok = text.load_tokenizer(str(empty))
    assert isinstance(tok, GPT2Tokenizer) and len(tok) <= 1  # the failure this guards against
    with pytest.raises(
        ConfigError,
        match=rf"data.tokenizer='{empty}': encodes the texts of data.train to no "
        rf"tokens .*does {empty} hold the model's tokenizer files",
    ):
        load_text(str(tmp_path / "a.txt"), str(tmp_path / "a.txt"), str(empty), task="causal_lm")


def test_a_word_tokenizer_that_fits_still_loads(tmp_path):
    word_tokenizer().save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "a.txt").write_text("apple pear plum\n")
    d = load_text(str(tmp_path / "a.txt"), str(tmp_path / "a.txt"), str(tmp_path / "tok"), task="causal_lm")
    assert d.train.tensors["attention_mask"].sum() == 3


def test_a_bert_directory_without_tokenizer_files_says_which_files_it_lacks(tmp_path):
    """From a BERT config alone transformers builds a 5-token tokenizer: every word becomes [UNK]."""
    empty = tmp_path / "bert"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "a.txt").write_text("apple pear plum\n")
    with pytest.raises(
        ConfigError,
        match=rf"data.tokenizer='{empty}': turns 100% of the tokens of data.train into "
        rf"its unknown token .*does {empty} hold its files: tokenizer.json",
    ):
        load_text(str(tmp_path / "a.txt"), str(tmp_path / "a.txt"), str(empty), task="causal_lm")
