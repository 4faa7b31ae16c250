"""Fuzz the artifact reader: >= 5,000 seeded mutations of real artifacts; prints outcomes and peak memory.

    python benchmarks/bench_fuzz.py [--cases 5000] [--seed 0]

Two artifacts: the test suite's TinyMLP (every encoding: mask, codebook, per-tensor and per-channel grids,
fp16 bias) and a LeNet-300-100 pruned to 8% and shared at 5 bits (1 MB dense), so that the memory bound
4 x dense size + allowance is measured where the model, not the interpreter, dominates.
Peak memory is resident set size (RSS), per case: the kernel's high-water mark VmHWM, reset before each case
through /proc/self/clear_refs, minus the RSS before the case; the largest over all cases is printed. RSS
counts torch's and constriction's allocations, which tracemalloc does not see.
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
from tests.artifact.fuzz import fuzz
from tests.artifact.helpers import CONFIG, constrain, magnitude_mask, model_with
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
print(json.dumps(fuzz(blob, int(sys.argv[2]), int(sys.argv[3])) | {'file_bytes': len(blob)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for name, cases in (("tiny", a.cases), ("lenet300", max(a.cases // 5, 1))):
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD, name, str(cases), str(a.seed)],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout
        r = json.loads(out)
        bound = 4 * r["dense_bytes"] + (32 << 20)
        print(f"{name}: {r['cases']:,} mutated artifacts of a {r['file_bytes']:,}-byte file "
              f"({r['dense_bytes']:,} dense bytes): {r['loaded']:,} loaded, {r['refused']:,} refused, "
              f"{len(r['unexpected'])} other exceptions; slowest case {r['slowest_s'] * 1e3:.0f} ms; "
              f"largest RSS growth in one case {r['peak_rss_growth_bytes'] / 2**20:.1f} MiB "
              f"(bound 4 x dense + 32 MiB = {bound / 2**20:.1f} MiB)")
        for u in r["unexpected"][:5]:
            print(u["error"])


if __name__ == "__main__":
    main()
