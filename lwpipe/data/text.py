"""Text from local files, tokenized with the model's tokenizer: `data=text`.

Files: `.txt` (one example per line, no labels), `.csv` or `.jsonl` with a
named text column and, for text_classification, a label column (whole numbers
0..classes-1, or names, numbered in sorted order). Without `train`/`test`, a
small real English corpus that ships with Python is used: the sentences of
the language reference in `pydoc_data.topics` (standard library; ~4,700
sentences), split 80/20 by a seeded shuffle; text_classification labels say
which of four reference sections a sentence comes from.

Every text is tokenized once (truncation to `max_length`, padding to the
longest text kept), so batches are dicts of tensors: input_ids,
attention_mask (token_type_ids where the tokenizer makes them) and labels.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lwpipe.data.bundle import DataBundle
from lwpipe.data.text_checks import TOKENIZER_FILES, check_encodes, clip_long, number_labels
from lwpipe.errors import ConfigError

log = logging.getLogger("lwpipe")

SUFFIXES = (".txt", ".csv", ".jsonl")
TEXT_TASKS = ("text_classification", "causal_lm", "embedding")
CLASS_TOPICS = ("compound", "string-methods", "debugger", "typesmapping")  # the built-in corpus's 4 labels


class DictDataset(Dataset):
    """Equal-length tensors by name; an item is a dict of rows, so DataLoader batches are dicts."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}

    def batches(self, size: int) -> list[dict]:
        return [{k: v[i : i + size] for k, v in self.tensors.items()} for i in range(0, len(self), size)]


def builtin_corpus(labelled: bool) -> list[tuple[str, int | None]]:
    """Sentences of Python's language reference (pydoc_data.topics): real English text, no download."""
    from pydoc_data.topics import topics

    names = CLASS_TOPICS if labelled else sorted(topics)
    out = []
    for label, name in enumerate(names):
        text = " ".join(topics[name].split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            if 4 <= len(s.split()) <= 60:
                out.append((s, label if labelled else None))
    return out


def read_csv(p: Path, key: str, path: str) -> list[dict]:
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            return list(reader)
        except csv.Error as e:  # e.g. a field over csv's 128 KiB limit
            raise ConfigError(key, path, f"line {reader.line_num} is not CSV that can be read: {e}") from None


def read_texts(path: str, key: str, text_column: str, label_column: str | None) -> list[tuple[str, object]]:
    p = Path(path).expanduser()
    if p.suffix not in SUFFIXES:
        raise ConfigError(key, path, f"unknown file type; use one of {', '.join(SUFFIXES)}")
    if not p.is_file():
        raise ConfigError(key, path, "no such file")
    if p.suffix == ".txt":
        if label_column:
            raise ConfigError(
                key,
                path,
                "a .txt file has no labels; text_classification needs a .csv or .jsonl "
                f"file with the columns {text_column!r} and {label_column!r}",
            )
        return [(line, None) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".csv":
        rows = read_csv(p, key, path)
        columns = list(rows[0]) if rows else []
    else:
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(key, path, f"line {i} is not JSON: {e}") from None
        columns = sorted({c for r in rows for c in r}) if rows else []
    for col, ckey in ((text_column, "data.text_column"), (label_column, "data.label_column")):
        if col and any(col not in r for r in rows):
            raise ConfigError(ckey, col, f"no such column in {path} (its columns: {', '.join(columns) or 'none'})")
    return [(str(r[text_column]), r[label_column] if label_column else None) for r in rows]


def load_tokenizer(path: str | None):
    if not path:
        raise ConfigError(
            "data.tokenizer",
            path,
            "required: the directory holding the model's tokenizer files (recipes with model=hf set it to model.path)",
        )
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError("data.tokenizer", path, "directory does not exist")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            "data.tokenizer",
            path,
            f"holds no tokenizer that transformers can read "
            f"(tokenizer.json or vocab files with tokenizer_config.json): {first}",
        ) from None
    if tok.pad_token is None:  # GPT-2's tokenizer has none: pad with end-of-text (masked out anyway)
        tok.pad_token = tok.eos_token
    return tok


def encode(tokenizer, pairs: list[tuple[str, object]], max_length: int, labelled: bool) -> DictDataset:
    enc = tokenizer([t for t, _ in pairs], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    tensors = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if labelled:
        tensors["labels"] = torch.tensor([v for _, v in pairs], dtype=torch.long)
    return DictDataset(tensors)


UNKNOWN_LIMIT = 0.9  # of the text tokens: a tokenizer that knows at most a tenth of the words does not fit


def check_unknown(tok, ds: DictDataset, key: str, path: str | None) -> None:
    """Refuse a tokenizer that turns nearly every token into its unknown token (a vocabulary for
    another language or model): training on that would run and learn nothing."""
    unk = tok.unk_token_id
    if unk is None:
        return
    ids, mask = ds.tensors["input_ids"], ds.tensors["attention_mask"].bool()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for i in set(tok.all_special_ids) - {unk}:
        special |= ids == i
    text = mask & ~special
    n = int(text.sum())
    share = int(((ids == unk) & text).sum()) / n if n else 0.0
    if share >= UNKNOWN_LIMIT:
        raise ConfigError(
            "data.tokenizer",
            path,
            f"turns {share:.0%} of the tokens of {key} into its unknown token "
            f"{tok.unk_token!r}: it does not fit these texts (use the model's own tokenizer; does "
            f"{path} hold its files: {TOKENIZER_FILES}?)",
        )
    if share >= 0.2:
        log.warning("data.tokenizer %s turns %.0f%% of the tokens of %s into %r", path, 100 * share, key, tok.unk_token)


def load_text(
    train: str | None = None,
    test: str | None = None,
    tokenizer: str | None = None,
    task: str = "text_classification",
    text_column: str = "text",
    label_column: str | None = "label",
    max_length: int = 128,
    limit_train: int | None = None,
    limit_test: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> DataBundle:
    """Train and test texts, tokenized with the model's tokenizer (see the module docstring)."""
    if task not in TEXT_TASKS:
        raise ConfigError("task.name", task, f"data=text feeds dict batches to the tasks {', '.join(TEXT_TASKS)}")
    labelled = task == "text_classification"
    if not 1 <= max_length <= 1 << 16:
        raise ConfigError("data.max_length", max_length, "must be between 1 and 65536")
    if (train is None) != (test is None):
        raise ConfigError(
            "data.test" if test is None else "data.train",
            None,
            "set data.train and data.test together (or neither, for the built-in corpus)",
        )
    if train is None:
        pairs = builtin_corpus(labelled)
        random.Random(split_seed).shuffle(pairs)
        n_test = int(round(len(pairs) * test_fraction))
        parts, name = [pairs[n_test:], pairs[:n_test]], "pydoc_topics"
    else:
        column = label_column if labelled else None
        parts = [
            read_texts(train, "data.train", text_column, column),
            read_texts(test, "data.test", text_column, column),
        ]
        name = f"text:{Path(train).name}"
    for part, key, limit in ((0, "data.train", limit_train), (1, "data.test", limit_test)):
        parts[part] = parts[part][:limit] if limit else parts[part]
        if not parts[part]:
            raise ConfigError(key, train if part == 0 else test, "holds no text")
        parts[part] = clip_long(parts[part], key, max_length)
    if labelled:
        parts = number_labels(parts)
    tok = load_tokenizer(tokenizer)
    train_ds, test_ds = (encode(tok, p, max_length, labelled) for p in parts)
    for ds, key in ((train_ds, "data.train"), (test_ds, "data.test")):
        check_encodes(tok, ds.tensors["attention_mask"], ds.tensors["input_ids"], key, tokenizer)
        check_unknown(tok, ds, key, tokenizer)
    h = hashlib.sha256(json.dumps([parts, max_length, tok.__class__.__name__, len(tok)]).encode())
    bundle = DataBundle(train_ds, test_ds, name=name, identity=h.hexdigest()[:16])
    bundle.tokenizer = tok
    for ds in (train_ds, test_ds):
        ds.vocab_size = len(tok)
    return bundle
