"""A small random Llama (word-level tokenizer) and texts for the deployment benchmarks, built in-process."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "the a of and with is was my your this red small big old new apple pear engine wheel gear".split()


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def save_llama(path: Path, hidden: int = 256, layers: int = 2) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


def write_texts(root: Path) -> tuple[Path, Path]:
    calib, test = root / "calib.txt", root / "test.txt"
    calib.write_text("\n".join(texts(64, 1)) + "\n")
    test.write_text("\n".join(texts(32, 2)) + "\n")
    return calib, test


def lwpipe_run(model: Path, calib: Path, test: Path, run_dir: Path, *extra: str) -> None:
    """`python -m lwpipe.cli recipe=gptq_w4 ... pipeline=[quantize,export] EXTRA hydra.run.dir=RUN_DIR`."""
    import subprocess
    import sys

    overrides = [
        "recipe=gptq_w4",
        f"model.path={model}",
        f"data.train={calib}",
        f"data.test={test}",
        "pipeline=[quantize,export]",
        "cache=false",
        "logger.console=null",
        "data.max_length=32",
        "calibration.samples=64",
        *extra,
    ]
    subprocess.run([sys.executable, "-m", "lwpipe.cli", *overrides, f"hydra.run.dir={run_dir}"], check=True)
