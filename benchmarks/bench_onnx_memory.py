"""Peak RSS of each phase of format=onnx on a bf16 Llama: where an export's memory goes.

    python benchmarks/bench_onnx_memory.py [--layers 10] [--keep DIR] [--threads 1]

Builds bench_large.py's Llama (TinyLlama-1.1B's widths: hidden 2048, intermediate 5632, vocabulary 32000)
with `--layers` blocks in bf16 (10: 571 M parameters, a float32 file of 2.29 GB, past protobuf's 2 GiB, so
torch writes the traced tensors beside the graph), loads it as the runner does, then calls
lwpipe.deploy.onnx.build on it and an ONNX Runtime session on the file, printing the RSS after each phase
and the highest RSS sampled (every 20 ms) during it. No lwpipe run: the phases of the export alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_large  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**30


class Phases:
    def __init__(self):
        self.peak, self.last = rss_gib(), time.perf_counter()
        self.lock = threading.Lock()  # a sample taken before a mark must not raise the next phase's highest
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self):
        while True:
            with self.lock:
                self.peak = max(self.peak, rss_gib())
            time.sleep(0.02)

    def mark(self, what: str) -> None:
        with self.lock:
            now = rss_gib()
            peak = max(self.peak, now)
            self.peak = now
        print(f"{what:24s} rss {now:6.2f} GiB  highest {peak:6.2f} GiB  {time.perf_counter() - self.last:7.1f} s")
        self.last = time.perf_counter()

    def wrap(self, module, name: str) -> None:
        real = getattr(module, name)

        def timed(*args, **kwargs):
            out = real(*args, **kwargs)
            self.mark(name)
            return out

        setattr(module, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", help="a directory to work in (and keep) instead of a temporary one")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from lwpipe.deploy import onnx as onnx_form
    from lwpipe.deploy import onnx_graph, onnx_static, onnx_store
    from lwpipe.models.hf import load_hf

    scratch = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_onnx_memory_"))
    bench_large.SHAPE["num_hidden_layers"] = a.layers
    model_dir = scratch / "model"
    if not (model_dir / "config.json").exists():
        n = bench_large.save_model(model_dir, bench_large.corpus_words())
        print(f"{n:,} parameters, bf16, {a.layers} blocks, in {model_dir}")
    phases = Phases()
    model, _ = load_hf(str(model_dir), "causal_lm")
    model.eval()
    phases.mark("load (bf16)")
    for module, name in [
        (onnx_static, "folded"),
        (onnx_form, "to_float32"),
        (onnx_form, "trace"),
        (onnx_graph, "quantize_graph"),
        (onnx_graph, "share_transposed"),
        (onnx_store, "save"),
    ]:
        phases.wrap(module, name)
    ids = torch.randint(0, 1000, (2, 16))
    out = scratch / "onnx"
    out.mkdir(exist_ok=True)
    info = onnx_form.build(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, out / "model.onnx")
    phases.mark("build returned")
    session = onnx_form.OrtModule(out / "model.onnx", threads=a.threads)
    phases.mark("ONNX Runtime session")
    del session
    files = sum(f.stat().st_size for f in out.iterdir())
    print(f"file: {files:,} bytes ({info.get('data_file', 'one file')}); converted from {info.get('converted_from')}")


if __name__ == "__main__":
    main()
