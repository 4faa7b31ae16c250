"""Cost of the run's read-back checks of its deployable outputs (lwpipe/deploy/check.py): time and memory.

    python benchmarks/bench_deploy_check.py [--hidden 512 --layers 13]     # ~30 M parameters

Runs `lwpipe recipe=gptq_w4 ... pipeline=[quantize,export] stages.quantize.group_size=32
++stages.export.format=[compressed_tensors,gguf] ++stages.export.gguf_type=q4_0` on a random Llama, then, in a
fresh process per check (so each process's peak is its own), loads model.lwp with its constraints and runs
the check again on the run's files: prints one JSON line per check with its seconds (one thread), the
process's peak RSS growth during the check, and the model's own bytes (fp32 parameters), next to the
seconds export.json recorded for the same check inside the run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.deploy_models import lwpipe_run, save_llama, write_texts  # noqa: E402

EXTRA = [
    "stages.quantize.group_size=32",
    "++stages.export.format=[compressed_tensors,gguf]",
    "++stages.export.gguf_type=q4_0",
    "measure.latency=false",
]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def one_check(run: Path, fmt: str) -> dict:
    """Runs the `fmt` check on the run's files in this process; its seconds and peak RSS growth."""
    import compressed_tensors  # noqa: F401  (imported before the baseline: the packages' code is not the check's)
    import gguf  # noqa: F401
    import torch
    from transformers import AutoTokenizer

    import lwpipe
    from lwpipe.deploy import check
    from lwpipe.stages.export import ExportConfig

    torch.set_num_threads(1)
    model = lwpipe.load(run / "model.lwp", constrained=True).eval()
    tok = AutoTokenizer.from_pretrained(str(run / "export" / "compressed_tensors"))
    texts = (run.parent / "test.txt").read_text().splitlines()[:8]
    batch = dict(tok(texts, return_tensors="pt", padding=True))
    ctx = SimpleNamespace(test_loader=lambda: [batch], data=SimpleNamespace(tokenizer=tok))
    cfg = ExportConfig(format=fmt, gguf_type="q4_0")
    with torch.no_grad():  # a forward's own memory is not the check's
        model(**batch)
    before, start = peak_rss(), time.perf_counter()
    info = {"file": "export/model.gguf" if fmt == "gguf" else "export/compressed_tensors/"}
    why = check.run(fmt, model, ctx, cfg, run / "export", info)
    seconds = time.perf_counter() - start
    assert why is None, why
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "check": fmt,
        "seconds": round(seconds, 3),
        "peak_rss_growth_bytes": peak_rss() - before,
        "model_bytes": params,
        "growth_vs_model": round((peak_rss() - before) / params, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=13)
    p.add_argument("--child", nargs=2, metavar=("RUN", "FORMAT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one_check(Path(a.child[0]), a.child[1])))
        return
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = save_llama(root / "llama", a.hidden, a.layers)
        calib, test = write_texts(root)
        lwpipe_run(model, calib, test, root / "run", *EXTRA, "threads=1")
        recorded = json.loads((root / "run" / "export.json").read_text())
        for fmt in ("compressed_tensors", "gguf"):
            child = [sys.executable, __file__, "--child", str(root / "run"), fmt]
            out = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            out["in_run_seconds"] = recorded[fmt]["check"]["seconds"]
            print(json.dumps(out))


if __name__ == "__main__":
    main()
