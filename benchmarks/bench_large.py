"""gptq_w4 on a 1.1 B-parameter Llama in bf16 through lwpipe's runner: wall time per phase and peak RSS.

    python benchmarks/bench_large.py [--samples 16] [--seq-len 256] [--threads 2] [--device cpu] [--keep DIR]
                                     [--layers N] [--timeout S] [--recipe sparsegpt_24_w4] [--set KEY=VALUE ...]

Builds a Llama of TinyLlama-1.1B's shape (LlamaConfig: hidden 2048, 22 layers, 32 heads, 4 key-value
heads, intermediate 5632, vocabulary 32000) with random weights in bf16, saves it with save_pretrained
(with a word-level tokenizer over the built-in corpus, no download) in a temporary directory, writes
`--samples` calibration texts and 8 held-out texts of about `--seq-len` tokens from the built-in corpus,
then runs in a child process

    lwpipe recipe=gptq_w4 model=hf task=causal_lm model.path=DIR data.train=calib.txt data.test=test.txt
           calibration.samples=16 calibration.seq_len=256 data.max_length=256 ...

and prints the wall time of each phase (the child's own records: load + baseline evaluation, the
quantize stage, its evaluation, writing and verifying model.lwp) and the child's peak RSS against the
targets: peak RSS <= 1.5 x the model's bf16 bytes + 1 GiB, and the whole run within 45 minutes.
`--recipe` runs another one-shot recipe (sparsegpt_24_w4) and `--set` adds overrides
(calibration.sequential=false). `--layers N` keeps the widths and builds N blocks instead of 22 (minutes
instead of most of an hour, for finding where the time and memory go). While the child runs, its log lines
are printed with the seconds since it started, its RSS then and the highest RSS sampled (every 0.1 s) since
the line before: the memory profile phase by phase.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPE = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
    max_position_embeddings=2048,
)
GIB = 1 << 30


def corpus_words() -> list[str]:
    from lwpipe.data.text import builtin_corpus

    return " ".join(t for t, _ in builtin_corpus(False)).split()


def save_model(path: Path, words: list[str]) -> int:
    """The random bf16 Llama and a word-level tokenizer over the corpus's words; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<s>", "<unk>", *dict.fromkeys(words)][: SHAPE["vocab_size"]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<s>", unk_token="<unk>", pad_token="<s>")
    cfg = LlamaConfig(**SHAPE, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no float32 copy of 4.4 GB
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    del model
    return n


def write_texts(path: Path, words: list[str], count: int, length: int, start: int) -> int:
    """`count` lines of `length` consecutive corpus words from word `start`; returns where it stopped."""
    lines = []
    for i in range(count):
        lines.append(" ".join(words[start + i * length : start + (i + 1) * length]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return start + count * length


def run_lwpipe(scratch: Path, model: Path, a) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of the child lwpipe run."""
    cmd = [
        sys.executable,
        "-m",
        "lwpipe.cli",
        f"recipe={a.recipe}",
        "model=hf",
        "task=causal_lm",
        f"model.path={model}",
        f"data.train={scratch / 'calib.txt'}",
        f"data.test={scratch / 'test.txt'}",
        f"calibration.samples={a.samples}",
        f"calibration.seq_len={a.seq_len}",
        f"data.max_length={a.seq_len}",
        "data.batch_size=4",
        "eval.batch_size=2",
        "cache=false",
        f"threads={a.threads}",
        f"device={a.device}",
        "name=bench_large",
        *a.set,
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    t = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=scratch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(child.pid)
    timer = threading.Timer(a.timeout, child.kill) if a.timeout else None
    if timer:
        timer.start()
    try:
        for line in child.stdout:  # its log: each line with the RSS since the line before
            now, high = sampler.take()
            print(f"[{time.perf_counter() - t:7.1f} s  rss {now / GIB:5.2f}  max {high / GIB:5.2f} GiB] {line}", end="")
        rc = child.wait()
    finally:
        sampler.stop()
        if timer:
            timer.cancel()
        if child.poll() is None:
            child.kill()
    if rc:
        raise SystemExit(f"lwpipe exited with {rc}")
    wall = time.perf_counter() - t
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB


class RssSampler:
    """The child's RSS every 0.1 s in a thread: `take()` gives (RSS now, highest since the last take)."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.high, self.now, self.done = psutil.Process(pid), 0, 0, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.done.wait(0.1):
            try:
                self.now = self.proc.memory_info().rss
            except Exception:
                return
            self.high = max(self.high, self.now)

    def take(self) -> tuple[int, int]:
        high, self.high = max(self.high, self.now), self.now
        return self.now, high

    def stop(self) -> None:
        self.done.set()


def phases(scratch: Path) -> dict[str, float]:
    run = sorted((scratch / "outputs" / "runs" / "bench_large").iterdir())[-1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    base = records[0]
    out = {"baseline evaluation": base.get("eval_seconds", 0.0)}
    for end in (r for r in records if r.get("event") == "stage_end"):
        out[f"{end['stage']} stage"] = end["seconds"]
        out[f"{end['stage']} record (evaluation, encoding)"] = end.get("eval_seconds", 0.0)
    out["whole run (the runner's own clock)"] = summary["seconds"]
    out["perplexity before -> after"] = (base["perplexity"], end["perplexity"])
    info = json.loads((run / "run_info.json").read_text())
    out["arithmetic (run_info.json compute_dtype)"] = info.get("compute_dtype", "not recorded")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="blocks (same widths)")
    p.add_argument("--timeout", type=float, default=None, help="seconds the lwpipe run may take")
    p.add_argument("--keep", help="a directory to work in (and keep) instead of a temporary one")
    p.add_argument("--recipe", default="gptq_w4", help="the one-shot recipe: gptq_w4 or sparsegpt_24_w4")
    p.add_argument("--set", action="append", default=[], help="an override for the run (repeatable)")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model of width 128: checks the script only")
    a = p.parse_args()
    if a.smoke:
        SHAPE.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        SHAPE.update(intermediate_size=256, vocab_size=2000)
    else:
        SHAPE.update(num_hidden_layers=a.layers)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(a.keep or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        words = corpus_words()
        t = time.perf_counter()
        n = save_model(scratch / "model", words)
        build = time.perf_counter() - t
        stop = write_texts(scratch / "calib.txt", words, a.samples, a.seq_len, 0)
        write_texts(scratch / "test.txt", words, 8, a.seq_len, stop)
        wall, peak = run_lwpipe(scratch, scratch / "model", a)
        bf16 = 2 * n
        target = 1.5 * bf16 + GIB
        print(f"\nLlama {n / 1e9:.2f} B parameters, bf16 {bf16 / GIB:.2f} GiB; built and saved in {build:.0f} s")
        for name, value in phases(scratch).items():
            print(f"  {name:42s} {f'{value:8.1f} s' if isinstance(value, float) else value}")
        print(f"  {'lwpipe wall time':42s} {wall:8.1f} s   (target <= 2700 s: {'met' if wall <= 2700 else 'MISSED'})")
        print(
            f"  {'peak RSS':42s} {peak / GIB:8.2f} GiB (target <= 1.5 x bf16 + 1 GiB = {target / GIB:.2f} GiB: "
            f"{'met' if peak <= target else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
