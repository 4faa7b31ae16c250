"""Checks on text data before it is tokenized or trained on (lwpipe/data/text.py).

Each names the file's key (data.train / data.test), the row and the bad value: class labels that are
empty, not whole numbers or mixed with names; an example longer than any tokenizer needs (a 55 MB line
made the Rust tokenizer abort the process); a tokenizer that turns the texts into no tokens at all (a
model directory without tokenizer files, from which transformers builds a one-token tokenizer).
"""

from __future__ import annotations

import logging
import math
import re

from lwpipe.errors import ConfigError

log = logging.getLogger("lwpipe")

WHOLE = re.compile(r"^[+-]?\d+$")
CHARS_PER_TOKEN = 64  # far above any real tokenizer's average (English: about 4): clipping drops nothing kept
TOKENIZER_FILES = "tokenizer.json, tokenizer_config.json, vocab.txt, vocab.json + merges.txt or a *.model file"


def _kind(v) -> tuple[str, int | None]:
    """('whole', n), ('empty', None), ('number', None) for a number that is no class (1.5, nan, inf), or
    ('name', None)."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return "empty", None
    if isinstance(v, bool):
        return "whole", int(v)
    if isinstance(v, int):
        return "whole", v
    text = str(v).strip()
    if WHOLE.match(text):
        return "whole", int(text)
    try:
        f = float(text)
    except ValueError:
        return "name", None
    return ("whole", int(f)) if math.isfinite(f) and f == int(f) else ("number", None)


def _where(keys: tuple[str, ...], part: int, row: int) -> str:
    return f"row {row + 1} of {keys[part]}"


def number_labels(
    pairs: list[list[tuple[str, object]]], keys: tuple[str, ...] = ("data.train", "data.test")
) -> list[list[tuple[str, int]]]:
    """Whole-number labels stay; names are numbered in sorted order (over train and test together). Refused,
    naming the value and its row: an empty label, a number that is not whole (1.5, nan, inf), a negative one,
    and names mixed with numbers."""
    kinds = [[_kind(v) for _, v in part] for part in pairs]
    numbers = any(k == "whole" for part in kinds for k, _ in part)
    for p, part in enumerate(kinds):
        for row, (kind, n) in enumerate(part):
            value = pairs[p][row][1]
            if kind == "empty":
                raise ConfigError(
                    "data.label_column", value, f"{_where(keys, p, row)} has no label; every text needs one"
                )
            if kind == "number":
                raise ConfigError(
                    "data.label_column",
                    value,
                    f"{_where(keys, p, row)}: not a whole number; labels are whole numbers 0..classes-1 or names",
                )
            if kind == "whole" and n < 0:
                raise ConfigError("data.label_column", value, f"{_where(keys, p, row)}: labels must be >= 0")
            if kind == "name" and numbers:
                raise ConfigError(
                    "data.label_column",
                    value,
                    f"{_where(keys, p, row)}: a name among whole-number "
                    f"labels; use numbers 0..classes-1 or names throughout",
                )
    if numbers:
        return [[(t, n) for (t, _), (_, n) in zip(part, ks)] for part, ks in zip(pairs, kinds)]
    index = {v: i for i, v in enumerate(sorted({str(v) for part in pairs for _, v in part}))}
    return [[(t, index[str(v)]) for t, v in part] for part in pairs]


def clip_long(pairs: list[tuple[str, object]], key: str, max_length: int) -> list[tuple[str, object]]:
    """Texts cut to max_length * CHARS_PER_TOKEN characters before tokenizing: the tokenizer keeps only
    max_length tokens anyway, and a text of tens of megabytes exhausts its memory (the process aborts)."""
    limit = max_length * CHARS_PER_TOKEN
    long = [i for i, (t, _) in enumerate(pairs) if len(t) > limit]
    if not long:
        return pairs
    first = long[0]
    log.warning(
        "%s: %d text(s) longer than %s characters (row %d: %s); only their first %s characters are "
        "tokenized (data.max_length=%d tokens never need more)",
        key,
        len(long),
        f"{limit:,}",
        first + 1,
        f"{len(pairs[first][0]):,}",
        f"{limit:,}",
        max_length,
    )
    out = list(pairs)
    for i in long:
        out[i] = (out[i][0][:limit], out[i][1])
    return out


def check_encodes(tok, mask, ids, key: str, path: str | None) -> None:
    """Refuse a tokenizer that turns the texts of `key` into no tokens at all (besides special ones)."""
    special = set(tok.all_special_ids) - {tok.unk_token_id}  # all unknown: check_unknown says so
    text = mask.bool().clone()
    for i in special:
        text &= ids != i
    if ids.numel() == 0 or not bool(text.any()):
        raise ConfigError(
            "data.tokenizer",
            path,
            f"encodes the texts of {key} to no tokens (its vocabulary has "
            f"{len(tok)}): does {path} hold the model's tokenizer files ({TOKENIZER_FILES})?",
        )
