"""lwpipe's GGUF files run in llama.cpp: tokens, logits and greedy text against lwpipe.load(model.lwp).

    python benchmarks/bench_gguf_llamacpp.py --llama-python VENV/bin/python [--hidden 64]

VENV is a virtual environment with llama-cpp-python, which builds from source with gcc and cmake; on a
CPU or sandbox without AMX, build it for AVX2 (a native build died with SIGILL here):
`CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF" VENV/bin/pip install llama-cpp-python`.
lwpipe does not need it. For a tiny Llama with each kind of tokenizer (byte-level BPE as GPT-2 / Llama 3,
sentencepiece-style BPE as Llama 2, and a word-level one llama.cpp has no tokenizer for) and a tiny GPT-2
with byte-level BPE, it runs `recipe=gptq_w4 ... pipeline=[quantize,export] ++stages.export.format=gguf`
for Q8_0 and Q4_0, then in VENV's python loads export/model.gguf with
llama_cpp.Llama and prints one JSON line per file: whether it loads, whether llama.cpp's tokens equal the
Hugging Face tokenizer's on held-out texts, the largest difference of llama.cpp's logits from those of the
model lwpipe.load rebuilds (relative to their largest magnitude; llama.cpp quantizes activations to 8 bits
in Q4_0/Q8_0 matmuls, so it is not 0), whether the greedy next tokens agree, and a greedy continuation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.hf_helpers import bpe_tokenizer, make_texts, save_gpt2, save_llama, word_tokenizer, write_txt  # noqa: E402

CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, texts, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
try:
    llm = Llama(model_path=path, logits_all=True, n_ctx=256, n_threads=1, verbose=False)
except ValueError as e:
    print(json.dumps({"loads": False, "error": str(e)})); sys.exit()
out = {"loads": True, "tokens": None, "text": None}
if llm.metadata.get("tokenizer.ggml.model") != "none":
    out["tokens"] = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
    done = llm.create_completion(texts[0], max_tokens=8, temperature=0.0)
    out["text"] = done["choices"][0]["text"]
    llm.reset()
llm.eval(ids)
out["logits"] = np.asarray(llm.scores[: len(ids)], dtype=np.float32).tolist()
print(json.dumps(out))
"""


def tokenizers():
    return {
        "byte_level": bpe_tokenizer("byte_level"),
        "sentencepiece": bpe_tokenizer("sentencepiece"),
        "word_level": word_tokenizer(),
    }


def run(model: Path, train: Path, test: Path, out: Path, gguf_type: str) -> None:
    bits = "8" if gguf_type == "q8_0" else "4"
    args = [
        f"model.path={model}",
        f"data.train={train}",
        f"data.test={test}",
        "recipe=gptq_w4",
        "model=hf",
        "task=causal_lm",
        "pipeline=[quantize,export]",
        "cache=false",
        "logger.console=null",
        "data.max_length=32",
        "calibration.samples=32",
        "stages.quantize.group_size=32",
        f"stages.quantize.bits={bits}",
        "++stages.export.format=gguf",
        f"++stages.export.gguf_type={gguf_type}",
        f"hydra.run.dir={out}",
    ]
    subprocess.run([sys.executable, "-m", "lwpipe.cli", *args], check=True, capture_output=True)


def check(py: str, run_dir: Path, tok, texts: list[str]) -> dict:
    import lwpipe

    ids = tok(texts[1])["input_ids"][:24]
    child = subprocess.run(
        [py, "-c", CHILD, str(run_dir / "export" / "model.gguf"), json.dumps(texts), json.dumps(ids)],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(child.stdout.strip().splitlines()[-1])
    if not got["loads"]:
        return got
    model = lwpipe.load(run_dir / "model.lwp").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0]
    theirs = torch.tensor(got.pop("logits"))
    hf_tokens = [tok(t)["input_ids"] for t in texts]
    tokens = got.pop("tokens")
    return got | {
        "tokens_equal": None if tokens is None else tokens == hf_tokens,
        "logits_max_rel_diff": round(float((theirs - ref).abs().max() / ref.abs().max()), 5),
        "greedy_agree": round(float((theirs.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llama-python", required=True)
    p.add_argument("--hidden", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    texts = [t for t, _ in make_texts(60, seed=7)]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        train, test = write_txt(root / "train.txt", make_texts(48)), write_txt(root / "test.txt", make_texts(16, 3))
        models = [("llama", style, tok) for style, tok in tokenizers().items()]
        models.append(("gpt2", "byte_level", bpe_tokenizer("byte_level")))
        for arch, style, tok in models:
            if arch == "llama":
                model = save_llama(root / style, tokenizer=tok, hidden=a.hidden)
            else:
                model = save_gpt2(root / "gpt2", tokenizer=tok)
            for gguf_type in ("q8_0", "q4_0"):
                out = root / f"run_{arch}_{style}_{gguf_type}"
                run(model, train, test, out, gguf_type)
                kind = json.loads((out / "export.json").read_text())["gguf"]["tokenizer"]
                head = {"model": arch, "tokenizer": style, "written_as": kind, "gguf_type": gguf_type}
                print(json.dumps(head | check(a.llama_python, out, tok, texts[-8:])), flush=True)


if __name__ == "__main__":
    main()
