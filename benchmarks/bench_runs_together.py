"""Start 2, 5 and 20 `lwpipe` runs at the same moment (plus one refused run each time); print how many
separate, complete run directories came out and how many FAILED markers (the target: n and 0).

    python benchmarks/bench_runs_together.py [2 5 20]

Each run is TinyMLP on blobs, one training epoch, in a fresh temporary folder per round.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_cli import runs_together  # noqa: E402


def main() -> None:
    for n in [int(a) for a in sys.argv[1:]] or [2, 5, 20]:
        with tempfile.TemporaryDirectory() as tmp:
            complete, failed = runs_together(Path(tmp), n)
        print(f"{n} runs started together: {complete} separate complete run directories, {failed} FAILED markers")


if __name__ == "__main__":
    main()
