"""GPTQ and SparseGPT on a causal language model trained here on real English text.

    python benchmarks/bench_gptq_lm.py [--minutes 4] [--threads 1] [--keep DIR] [--peer VENV/bin/python]

Trains a small GPT-2 (4 layers, 256 wide, a 2,000-token BPE vocabulary trained on the same text) for
`--minutes` on the sentences of Python's language reference (pydoc_data.topics: the standard library,
no download), split as lwpipe splits its built-in corpus (seed 0, 20% held out). Then, through
`lwpipe` on the saved model directory with 128 training sentences for calibration and the held-out
ones for perplexity: round to nearest on gptq_w4's grid (method=rtn; clip_search stays on), gptq_w4, and
sparsegpt_24_w4 (block-sequential, the default) and again with calibration.sequential=false (every
layer's Hessian from the original model in one pass).
Targets: GPTQ's perplexity increase at most half of round-to-nearest's; SparseGPT 2:4 + GPTQ's at
most 2x GPTQ's.

--peer: the Python of a venv with llmcompressor runs benchmarks/peer_llmcompressor_lm.py on the same model,
calibration and held-out sentences (W4A16 rounding and GPTQ, SparseGPT 2:4 alone and followed by GPTQ), which
saves each result as a dense fp32 model; lwpipe then measures each with an empty pipeline (`pipeline=[]`: the
baseline evaluation only), so both sides' perplexities come from the same code. Tells whether the peer meets
the same two targets against its own rows: evidence of what these targets ask of a model this small.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def corpus() -> tuple[list[str], list[str]]:
    from lwpipe.data.text import builtin_corpus

    pairs = builtin_corpus(False)
    random.Random(0).shuffle(pairs)
    n = int(round(len(pairs) * 0.2))
    return [t for t, _ in pairs[n:]], [t for t, _ in pairs[:n]]


def train_model(out: Path, train: list[str], minutes: float) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<eos>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(fast), n_embd=256, n_layer=4, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = random.Random(0)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < 60 * minutes:
        batch = fast(rng.sample(train, 16), truncation=True, max_length=64, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s, last loss {loss.item():.3f}", flush=True)
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))


def lwpipe_run(model: Path, calib: Path, test: Path, run_dir: Path, recipe: str, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "lwpipe.cli",
        f"recipe={recipe}",
        "model=hf",
        "task=causal_lm",
        f"model.path={model}",
        f"data.train={calib}",
        f"data.test={test}",
        "data.max_length=64",
        "cache=false",
        "threads=1",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", help="keep (or reuse) the trained model directory here")
    p.add_argument("--peer", metavar="VENV_PYTHON", help="also run llm-compressor with this Python (a venv's)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    train, test = corpus()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = Path(a.keep) if a.keep else scratch / "model"
        if not (model / "config.json").exists():
            train_model(model, train, a.minutes)
        calib, held = scratch / "calib.txt", scratch / "test.txt"
        calib.write_text("\n".join(train[:128]) + "\n", encoding="utf-8")
        held.write_text("\n".join(test) + "\n", encoding="utf-8")
        rows = {}
        for name, recipe, extra in (
            (
                "round to nearest",
                "gptq_w4",
                [
                    "stages.quantize.method=rtn",
                    "~stages.quantize.damp",
                    "~stages.quantize.act_order",
                ],
            ),
            ("gptq_w4", "gptq_w4", []),
            ("sparsegpt_24_w4", "sparsegpt_24_w4", []),  # calibration.sequential: block by block
            ("sparsegpt one pass", "sparsegpt_24_w4", ["calibration.sequential=false"]),  # the original's Hessians
        ):
            summary = lwpipe_run(model, calib, held, scratch / name.replace(" ", "_"), recipe, extra)
            base, final = summary["baseline"]["perplexity"], summary["final"]["perplexity"]
            rows[name] = final - base
            print(
                f"  {name:18s} perplexity {base:.3f} -> {final:.3f} ({final - base:+.3f}), "
                f"{summary['final']['compression_ratio']:.2f}x smaller than fp32",
                flush=True,
            )
        rtn, gptq, sparse = rows["round to nearest"], rows["gptq_w4"], rows["sparsegpt_24_w4"]
        first = "MET" if gptq <= 0.5 * rtn else "MISSED"
        second = "MET" if sparse <= 2 * max(gptq, 0.0) else "MISSED"
        print(
            f"GPTQ's increase {gptq:+.3f} vs round to nearest's {rtn:+.3f} (target: at most half): {first}; "
            f"SparseGPT 2:4 + GPTQ's {sparse:+.3f} vs GPTQ's (target: at most 2x): {second}"
        )
        if a.peer:
            peer_rows(a.peer, model, calib, held, scratch, a.threads)


PEER_ROWS = {  # peer_llmcompressor_lm.py's variant -> the row's label
    "rtn": "round to nearest W4A16 (min-max)",
    "rtn_mse": "round to nearest W4A16 (MSE observer)",
    "gptq": "GPTQ W4A16 (min-max)",
    "gptq_mse": "GPTQ W4A16 (MSE observer)",
    "sparse24": "SparseGPT 2:4 alone",
    "sparse24_gptq": "SparseGPT 2:4 + GPTQ (min-max)",
    "sparse24_gptq_mse": "SparseGPT 2:4 + GPTQ (MSE observer)",
    "sparse24_gptq_keep0": "SparseGPT 2:4 + zero-keeping GPTQ",
}


def measured(model: Path, calib: Path, held: Path, run_dir: Path) -> float:
    """lwpipe's perplexity of a model directory as it is: an empty pipeline, so only the baseline evaluation."""
    return lwpipe_run(model, calib, held, run_dir, "gptq_w4", ["pipeline=[]", "artifact=false"])["baseline"][
        "perplexity"
    ]


def peer_rows(python: str, model: Path, calib: Path, held: Path, scratch: Path, threads: int) -> None:
    """llm-compressor's variants on the same model and sentences, each measured by lwpipe with an empty pipeline."""
    out = scratch / "peer"
    script = Path(__file__).with_name("peer_llmcompressor_lm.py")
    cmd = [python, str(script), str(model), str(calib), str(held), str(out), "--max-length", "64"]
    done = subprocess.run([*cmd, "--threads", str(threads)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the peer failed ({done.returncode}):\n{done.stderr[-4000:]}")
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    base = measured(model, calib, held, scratch / "peer_base")
    print(f"llm-compressor (oneshot, the same model and sentences; perplexity by lwpipe's evaluator), base {base:.3f}:")
    rows = {}
    for name, label in PEER_ROWS.items():
        ppl = measured(out / name, calib, held, scratch / f"peer_{name}")
        rows[name] = ppl - base
        f = facts[name]
        print(
            f"  {label:42s} perplexity {base:.3f} -> {ppl:.3f} ({ppl - base:+.3f}), zeros {f['zero_fraction']:.1%}, "
            f"groups of 4 with 2+ zeros {f['groups_2of4']:.1%}, {f['seconds']:.0f} s"
            f", copy's largest logit difference {f['max_logit_diff']:.1e}",
            flush=True,
        )
    for tag in ("", "_mse"):
        rtn, gptq = rows["rtn" + tag], rows["gptq" + tag]
        print(
            f"llm-compressor{' (MSE observer)' if tag else ''}: GPTQ's increase {gptq:+.3f} vs its rounding's "
            f"{rtn:+.3f} (target: at most half): {'MET' if gptq <= 0.5 * rtn else 'MISSED'}"
        )
    for sparse, gptq in (
        ("sparse24_gptq", "gptq"),
        ("sparse24_gptq_mse", "gptq_mse"),
        ("sparse24_gptq_keep0", "gptq"),
        ("sparse24", "gptq"),
    ):
        s, g = rows[sparse], rows[gptq]
        print(
            f"llm-compressor: {PEER_ROWS[sparse]}: {s:+.3f} vs its {PEER_ROWS[gptq]}'s {g:+.3f} (target: at most 2x): "
            f"{'MET' if s <= 2 * max(g, 0.0) else 'MISSED'} ({s / g if g > 0 else float('inf'):.1f}x)"
        )


if __name__ == "__main__":
    main()
