"""Peak memory of hostile data files: a gzip-bombed MNIST IDX file and a one-line .txt of tens of megabytes.

    python benchmarks/bench_hostile_data.py [--bomb-gb 11] [--line-mb 55]

Each case runs in a fresh process and prints its outcome (the error lwpipe gives, or "loaded") with the
process's peak resident memory (ru_maxrss) and the same process's memory after imports. The bomb is an
IDX images file whose header declares MNIST's 60,000 x 28 x 28 images (47 MB), followed by `--bomb-gb`
GB of zeros, gzip level 9 (about 1 MB per GB). The long line is one `.txt` line of `--line-mb` MB of
words, loaded with data=text (task causal_lm, max_length 128) and the test suite's tiny BERT tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, resource, sys, time
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
case, path = sys.argv[1], sys.argv[2]
from lwpipe.errors import LwpipeError
if case == 'bomb':
    from lwpipe.data.mnist import load_mnist as load
else:
    from lwpipe.data.text import load_text
    from tests.hf_helpers import bert_tokenizer
    bert_tokenizer().save_pretrained(path + '/tok')
    load = lambda p: load_text(p + '/line.txt', p + '/test.txt', p + '/tok', task='causal_lm', max_length=128)
base, t = rss(), time.perf_counter()
try:
    load(path)
    outcome = 'loaded'
except LwpipeError as e:
    outcome = str(e)[:160]
print(json.dumps({'outcome': outcome, 'seconds': round(time.perf_counter() - t, 2), 'rss_after_imports_mb': round(base),
                  'peak_rss_mb': round(rss())}))
"""


def write_idx_gz(path: Path, dims: tuple[int, ...], payload_bytes: int) -> None:
    chunk = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(b"\x00\x00\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims))
        for _ in range(payload_bytes >> 20):
            f.write(chunk)


def run(case: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, case, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"outcome": f"exit {out.returncode}: {out.stderr.strip()[-200:]}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bomb-gb", type=float, default=11.0)
    ap.add_argument("--line-mb", type=float, default=55.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_idx_gz(root / "train-images-idx3-ubyte.gz", (60000, 28, 28), int(a.bomb_gb * (1 << 30)))
        for name, dims in (
            ("train-labels-idx1-ubyte.gz", (60000,)),
            ("t10k-images-idx3-ubyte.gz", (10000, 28, 28)),
            ("t10k-labels-idx1-ubyte.gz", (10000,)),
        ):
            write_idx_gz(root / name, dims, 0)
        size = (root / "train-images-idx3-ubyte.gz").stat().st_size
        print(
            f"gzip bomb ({size / 1e6:.1f} MB .gz, {a.bomb_gb:g} GB of zeros after the header):",
            json.dumps(run("bomb", root)),
        )
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        words = "apple pear plum grape melon lemon cherry peach mango fig "
        (root / "line.txt").write_text(words * int(a.line_mb * 1e6 / len(words)) + "\n")
        (root / "test.txt").write_text("apple pear\n")
        print(f"one-line .txt of {a.line_mb:g} MB:", json.dumps(run("line", root)))


if __name__ == "__main__":
    main()
