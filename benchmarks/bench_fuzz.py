"""Fuzz the artifact readers: >= 10,000 hostile files, each read by lwpipe.load and by lwpipe-inspect's reader.

    python benchmarks/bench_fuzz.py [--cases 10000] [--seed 0] [--time-limit 20] [--classes mutation table ...]

Two runs, each in a child process limited to 3 GiB of address space (RLIMIT_AS), with a time limit per read:
  tiny      the test suite's TinyMLP (every encoding: mask, codebook, per-tensor and per-channel grids, fp16
            bias), `--cases` files taken from every class of tests/artifact/fuzz.py in turn (mutations of
            the real file, and one forged class per hostile-file generator of tests/artifact/forge.py)
  lenet300  a LeNet-300-100 pruned to 8% and shared at 5 bits (1 MB dense), --cases / 5 mutations, so the
            memory bound 4 x dense size + allowance is measured where the model, not the interpreter, dominates
Peak memory is resident set size (RSS), per read: the kernel's high-water mark VmHWM, reset before each read
through /proc/self/clear_refs, minus the RSS before it; the largest over all reads is printed, with every
read that grew past 4 x its own declared dense size + 32 MiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from lwpipe.artifact import encode_model
from tests.artifact.fuzz import fuzz, limit_address_space
from tests.artifact.helpers import CONFIG, magnitude_mask, model_with
limit_address_space()
if sys.argv[1] == 'tiny':
    blob = encode_model(model_with('pruned+shared+quant+half_bias', 'pruned+quant_channel'), CONFIG)
else:
    from lwpipe.constraints import ensure_constraint
    from lwpipe.models import LeNet300
    torch.manual_seed(0)
    model = LeNet300().eval()
    for layer in (model.fc1, model.fc2, model.fc3):
        c = ensure_constraint(layer)
        c.set_mask(magnitude_mask(layer.weight.detach(), 0.08))
        w = layer.weight.detach()
        centroids = torch.linspace(w.min().item(), w.max().item(), 32)
        c.set_codebook((w.unsqueeze(-1) - centroids).abs().argmin(-1), centroids)
    blob = encode_model(model, {'_target_': 'lwpipe.models.LeNet300'})
out = fuzz(blob, int(sys.argv[2]), int(sys.argv[3]), tuple(sys.argv[5].split(',')), time_limit=float(sys.argv[4]))
print(json.dumps(out | {'file_bytes': len(blob)}))
"""


def report(name: str, r: dict) -> None:
    print(
        f"{name}: {r['cases']:,} files ({r['dense_bytes']:,}-byte dense base file of {r['file_bytes']:,} bytes), "
        f"address space limit {r['address_space_limit'] / 2**30:.1f} GiB, {r['time_limit_s']:.0f} s a read"
    )
    for kind, readers in r["by_class"].items():
        cells = "; ".join(
            f"{reader}: {c['loaded']} loaded, {c['refused']} refused, {c['unexpected']} other "
            f"exceptions, {c['hang']} hangs, {c['nonfinite']} non-finite loads"
            for reader, c in readers.items()
        )
        print(f"  {kind:12s} {cells}")
    slowest = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["slowest_s"].items())
    print(
        f"  slowest read: {slowest}; largest RSS growth in one read {r['peak_rss_growth_bytes'] / 2**20:.1f} MiB; "
        f"reads over 4 x their declared dense size + 32 MiB: {len(r['over_memory'])}"
    )
    for u in r["unexpected"][:5]:
        print(f"  [{u['class']} / {u['reader']}] {u['error'].strip().splitlines()[-1]}")


def main() -> None:
    from tests.artifact.fuzz import CLASSES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=20.0, help="seconds a read may take before it is a hang")
    p.add_argument("--classes", nargs="+", default=list(CLASSES), choices=CLASSES)
    a = p.parse_args()
    for name, cases, classes in (("tiny", a.cases, a.classes), ("lenet300", max(a.cases // 5, 1), ["mutation"])):
        out = subprocess.run(
            [
                sys.executable,
                "-W",
                "ignore",
                "-c",
                CHILD,
                name,
                str(cases),
                str(a.seed),
                str(a.time_limit),
                ",".join(classes),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode:
            sys.exit(f"{name}: the fuzz process failed:\n{out.stderr[-3000:]}")
        report(name, json.loads(out.stdout))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
