"""Tiny transformers models, tokenizers and text files built in-process (no download)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = {
    0: "apple pear plum grape melon lemon cherry peach mango fig".split(),
    1: "engine wheel brake piston gear clutch axle motor valve pump".split(),
}
COMMON = "the a of and with is was my your this that very red small big old new".split()


def make_texts(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Short generated sentences; the label says which word family they use (learnable)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(WORDS[label] if rng.random() < 0.5 else COMMON) for _ in range(rng.randint(4, 10))]
        out.append((" ".join(words), label))
    return out


def vocabulary() -> list[str]:
    words = {w for ws in WORDS.values() for w in ws} | set(COMMON)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]


def bert_tokenizer(extra: int = 0):
    """A WordPiece tokenizer over the generated texts' words (`extra` unused tokens make it bigger)."""
    from transformers import BertTokenizer

    words = vocabulary() + [f"extra{i}" for i in range(extra)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def word_tokenizer():
    """A word-level tokenizer for GPT-2-style models (eos doubles as padding, as for GPT-2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", *vocabulary()[5:]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"
    )


def bpe_tokenizer(style: str = "byte_level"):
    """A BPE tokenizer trained on the generated texts: `byte_level` as GPT-2 / Llama 3 write them, or
    `sentencepiece` as Llama 2 / Mistral's tokenizer.json ("▁" pieces, byte fallback to <0xNN> tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t, _ in make_texts(200)]
    if style == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet, special = pre_tokenizers.ByteLevel.alphabet(), ["<|endoftext|>"]
        tok.train_from_iterator(
            texts, trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=alphabet)
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special[0], pad_token=special[0])
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=special))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def bert_config(vocab_size: int, **kw):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **kw,
    )


def save_bert(path: Path, kind: str = "classifier", num_labels: int = 2, seed: int = 0) -> Path:
    """A random tiny BERT in `path` (save_pretrained) with its tokenizer: kind classifier or encoder."""
    from transformers import BertForSequenceClassification, BertModel

    path.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer()
    torch.manual_seed(seed)
    cfg = bert_config(len(tok), num_labels=num_labels)
    model = BertForSequenceClassification(cfg) if kind == "classifier" else BertModel(cfg)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def save_gpt2(path: Path, seed: int = 0, tied: bool = True, tokenizer=None) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or word_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    GPT2LMHeadModel(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def save_sentence_model(path: Path, seed: int = 0, normalize: bool = True, pooling: str = "mean") -> Path:
    """A sentence-transformers directory: the BERT encoder at the root, 1_Pooling, 2_Normalize."""
    save_bert(path, "encoder", seed=seed)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return path


def write_csv(path: Path, rows: list[tuple[str, int]], text: str = "text", label: str = "label") -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([text, label])
        w.writerows(rows)
    return path


def write_txt(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("\n".join(t for t, _ in rows) + "\n")
    return path


def save_llama(path, dtype=torch.float32, tokenizer=None, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or word_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
