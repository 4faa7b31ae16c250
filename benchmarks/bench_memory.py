"""Peak memory and encode/decode speed on a GPT-2-small-sized model (124 M parameters, random weights).

    python benchmarks/bench_memory.py               # GPT2Config(): 12 layers, 124 M parameters (~2-4 min)
    python benchmarks/bench_memory.py --layers 2    # a quick check of the script (same embedding)
    python benchmarks/bench_memory.py --runner      # the same chain through lwpipe.runner.run instead

--runner saves the random model with save_pretrained (and a word-level tokenizer over the built-in
corpus) in a temporary directory and runs recipe=gpt2_causal_lm with pipeline=[prune,share,quantize],
finetune.epochs 0, cache off: evaluation, model.lwp encoding, checkpoints and all. Its peak RSS is
the whole run's (from just before the runner builds the model), as a multiple of fp32.

One-shot prune -> share -> quantize through the stages' Python API (no fine-tuning,
no runner: the runner keeps extra model copies, see the README), then model.lwp
encode, and decode back into a model. Printed: the process's peak RSS in each phase
and overall, as a multiple of the model's fp32 size (target <= 4x), and encode /
decode throughput in MB/s of fp32 weights (target >= 20 MB/s). The peak of each
phase is measured by resetting the kernel's high-water mark (/proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

MB = 1 << 20


def rss() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset), in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (GPT-2 small: 12)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--share-bits", type=int, default=4)
    p.add_argument("--quant-bits", type=int, default=8)
    p.add_argument("--runner", action="store_true", help="drive lwpipe.runner.run with a one-shot recipe")
    a = p.parse_args()
    if a.runner:
        return through_runner(a)

    import transformers

    from lwpipe.artifact import encode_model
    from lwpipe.artifact.decode import bake_in_place, build, read
    from lwpipe.context import Context
    from lwpipe.data import DataBundle
    from lwpipe.stages.prune import Prune, PruneConfig
    from lwpipe.stages.quantize import Quantize, QuantizeConfig
    from lwpipe.stages.share import Share, ShareConfig

    base, _ = rss()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
        f"process after imports: {base:.0f} MiB"
    )
    cfg = transformers.GPT2Config(n_layer=a.layers)
    torch.manual_seed(0)
    reset_peak()
    t = time.perf_counter()
    model = transformers.GPT2LMHeadModel(cfg).eval()
    params = model.num_parameters()
    fp32 = 4 * params / MB
    print(
        f"GPT-2 ({a.layers} layers): {params / 1e6:.1f} M parameters, fp32 {fp32:.0f} MiB "
        f"(lm_head tied to wte: {model.lm_head.weight is model.transformer.wte.weight}); "
        f"built in {time.perf_counter() - t:.1f} s"
    )
    phases = [("build (transformers' random init)", *rss())]

    ids = torch.zeros(8, 16, dtype=torch.long)  # never read: no fine-tuning, magnitude criterion
    ctx = Context(
        data=DataBundle(TensorDataset(ids, ids[:, 0]), TensorDataset(ids, ids[:, 0]), "none", "none"),
        seed=0,
        run_dir=Path(tempfile.gettempdir()),
    )
    one_shot = {"finetune": {"epochs": 0}}
    stages = [
        ("prune", Prune(PruneConfig(sparsity=a.sparsity, **one_shot))),
        ("share", Share(ShareConfig(bits=a.share_bits, **one_shot))),
        ("quantize", Quantize(QuantizeConfig(bits=a.quant_bits, **one_shot))),
    ]
    for name, stage in stages:
        reset_peak()
        t = time.perf_counter()
        with torch.no_grad():
            model = stage.run(model, ctx)
        gc.collect()
        phases.append((f"{name} ({time.perf_counter() - t:.1f} s)", *rss()))

    reset_peak()
    t, cpu = time.perf_counter(), time.process_time()
    blob = encode_model(model, None)
    encode_s, encode_cpu = time.perf_counter() - t, time.process_time() - cpu
    phases.append(("encode", *rss()))
    with torch.no_grad():
        x = torch.randint(0, cfg.vocab_size, (1, 32))
        expected = model(x).logits
    del model
    gc.collect()

    reset_peak()
    with torch.device("meta"):  # the decoder overwrites every tensor: no random init for the target
        target = transformers.GPT2LMHeadModel(cfg)
    target.to_empty(device="cpu")
    t, cpu = time.perf_counter(), time.process_time()
    art = read(blob)
    loaded = bake_in_place(build(art, module=target))
    del art
    decode_s, decode_cpu = time.perf_counter() - t, time.process_time() - cpu
    gc.collect()
    phases.append(("decode into a plain model", *rss()))
    with torch.no_grad():
        exact = torch.equal(loaded(x).logits, expected)

    print(
        f"\nmodel.lwp: {len(blob) / MB:.1f} MiB, {4 * params / len(blob):.1f}x smaller than fp32; "
        f"decoded model's logits identical: {exact}"
    )
    for what, wall, cpu in (("encode", encode_s, encode_cpu), ("decode", decode_s, decode_cpu)):
        print(
            f"{what}: {wall:5.1f} s wall = {4 * params / MB / wall:6.1f} MB/s of fp32 weights (target >= 20); "
            f"{cpu:5.1f} s CPU time = {4 * params / MB / cpu:6.1f} MB/s per CPU-second (a shared machine "
            f"stretches wall time)"
        )
    print(f"\n{'phase':<36}{'RSS after':>11}{'peak':>9}{'peak / fp32':>13}")
    for name, now, peak in phases:
        print(f"{name:<36}{now:>9.0f} M{peak:>7.0f} M{peak / fp32:>12.2f}x")
    top = max(peak for _, _, peak in phases)  # ru_maxrss forgets peaks before a reset
    print(
        f"{'whole run':<36}{'':>11}{top:>7.0f} M{top / fp32:>12.2f}x   (target <= 4x; "
        f"{base:.0f} M of it is torch + transformers before any model)"
    )


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the built-in corpus (no download), at most vocab_size tokens."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lwpipe.data.text import builtin_corpus

    pre = pre_tokenizers.Whitespace()
    counts = Counter(w for s, _ in builtin_corpus(False) for w, _ in pre.pre_tokenize_str(s))
    words = ["<|endoftext|>", "<unk>", *[w for w, _ in counts.most_common(vocab_size - 2)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"
    )


def through_runner(a) -> None:
    import transformers
    from hydra import compose, initialize_config_dir

    from lwpipe.cli import RECIPES
    from lwpipe.config import validate
    from lwpipe.runner import run

    cfg = transformers.GPT2Config(n_layer=a.layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2"
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        params = model.num_parameters()
        model.save_pretrained(path)
        word_tokenizer(cfg.vocab_size).save_pretrained(path)
        del model
        gc.collect()
        fp32 = 4 * params / MB
        overrides = [
            "recipe=gpt2_causal_lm",
            f"model.path={path}",
            "pipeline=[prune,share,quantize]",
            f"stages.prune.sparsity={a.sparsity}",
            f"stages.share.bits={a.share_bits}",
            f"stages.quantize.bits={a.quant_bits}",
            "cache=false",
            "measure.latency=false",
            "logger.console=null",
            "data.limit_train=16",
            "data.limit_test=8",
            "eval.batch_size=4",
        ]
        with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
            recipe = validate(compose(config_name="config", overrides=overrides))
        base, _ = rss()
        reset_peak()
        t = time.perf_counter()
        final = run(recipe, Path(tmp) / "run")
        wall = time.perf_counter() - t
        now, peak = rss()
        lwp = (Path(tmp) / "run" / "model.lwp").stat().st_size
    print(
        f"GPT-2 ({a.layers} layers, {params / 1e6:.1f} M parameters, fp32 {fp32:.0f} MiB) through "
        f"lwpipe.runner.run, recipe gpt2_causal_lm, pipeline [prune, share, quantize], one-shot, cache off: "
        f"{wall:.0f} s"
    )
    print(f"model.lwp {lwp / MB:.1f} MiB ({4 * params / lwp:.1f}x); final perplexity {final['perplexity']:.1f}")
    print(
        f"peak RSS during the run {peak:.0f} MiB = {peak / fp32:.2f}x fp32 (target <= 4x; {base:.0f} MiB "
        f"of it is the process before the run: torch, transformers, Hydra); RSS after the run {now:.0f} MiB"
    )


if __name__ == "__main__":
    main()
