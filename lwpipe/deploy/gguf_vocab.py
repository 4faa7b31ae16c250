"""The tokenizer of a GGUF file, in the vocabulary type llama.cpp tokenizes with, as convert_hf_to_gguf.py
writes it (through the `gguf` package's own vocab readers):

- byte-level BPE (GPT-2, Llama 3, Qwen: a ByteLevel pre-tokenizer): `gpt2`, tokens and merges;
- BPE with byte fallback over "▁" pieces (Llama 2, TinyLlama, Mistral: sentencepiece models saved as
  tokenizer.json): `llama`, tokens with scores and types from gguf.LlamaHfVocab;
- anything else (WordLevel, WordPiece, Unigram): llama.cpp has no such tokenizer, so the file carries
  `none` (llama.cpp runs it on token ids; it cannot tokenize text) and the export record says so.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def kind_of(tok) -> str:
    """'gpt2', 'llama' or 'none': the llama.cpp vocabulary type this Hugging Face tokenizer can be written as."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "none"
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not model.get("merges"):
        return "none"
    if '"ByteLevel"' in pre:
        return "gpt2"
    if model.get("byte_fallback") and (spec.get("decoder") or {}).get("type") == "Sequence":
        return "llama"
    return "none"


def write_vocab(writer, tok, c) -> str:
    """Writes the tokenizer's vocabulary (padded to the model's vocab_size) and special ids; returns its kind."""
    import gguf

    kind = "none" if tok is None else kind_of(tok)
    writer.add_tokenizer_model(kind)
    if kind == "none":
        return kind
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        if kind == "llama":
            tokens, scores, types = map(list, zip(*gguf.LlamaHfVocab(Path(d)).all_tokens(), strict=True))
        else:
            tokens, types = byte_level_tokens(tok, c.vocab_size)
            scores = None
        pad = c.vocab_size - len(tokens)  # the llama vocabulary stops at the tokenizer's size
        tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), c.vocab_size)]
        types += [gguf.TokenType.UNUSED] * max(pad, 0)
        writer.add_tokenizer_pre("gpt-2" if c.model_type == "gpt2" and kind == "gpt2" else "default")
        writer.add_token_list(tokens[: c.vocab_size])
        writer.add_token_types(types[: c.vocab_size])
        if scores is not None:
            writer.add_token_scores(scores[: c.vocab_size] + [-1000.0] * max(pad, 0))
        gguf.SpecialVocab(d, load_merges=kind == "gpt2", n_vocab=c.vocab_size).add_to_gguf(writer)
    return kind


def byte_level_tokens(tok, n: int) -> tuple[list, list]:
    """The model's `n` tokens in id order and their types (control for special tokens, unused for ids the
    tokenizer lacks), as convert_hf_to_gguf's gpt2 vocab."""
    import gguf

    by_id = {i: t for t, i in tok.get_vocab().items()}
    special = set(tok.all_special_ids)
    tokens, types = [], []
    for i in range(n):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        kind = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        types.append(kind if i in by_id else gguf.TokenType.UNUSED)
    return tokens, types
