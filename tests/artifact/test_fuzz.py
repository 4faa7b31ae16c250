"""Seeded fuzz: mutations of a real artifact (header fields, body bits, raw bytes, checksums made to match) and
forged files of every hostile class (tests/artifact/forge.py), each read by lwpipe.load and by lwpipe-inspect's
reader in a child process limited to 3 GiB of address space, with a time limit per read.

Every file is refused with ArtifactError or loaded; none raises anything else or hangs, and no read grows the
process past 4x the declared dense size plus a fixed allowance. benchmarks/bench_fuzz.py runs 10,000+ files.
"""

import json
import subprocess
import sys

import pytest

MINE = ("tied", "memory", "not_regular", "constructor", "table")
GRID = ("dtype", "grid_shape", "non_finite")  # refused by the grid, dtype and non-finite checks (limits.check_layer)


def fuzz(cases: int, seed: int, *classes: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tests.artifact.fuzz", str(cases), str(seed), *classes],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


@pytest.mark.slow
def test_mutated_artifacts_are_refused_or_loaded_within_memory():
    out = fuzz(600, 7, "mutation")
    assert out["unexpected"] == [], out["unexpected"][:3]
    assert out["hangs"] == [] and out["over_memory"] == [], out
    for reader, c in out["by_class"]["mutation"].items():
        assert c["refused"] > 400 and c["loaded"] > 5, (reader, c)  # the mutations reach both outcomes
    assert out["address_space_limit"] == 3 << 30


@pytest.mark.slow
def test_forged_files_of_every_class_are_refused_or_loaded():
    out = fuzz(40 * len(MINE), 11, *MINE)
    assert out["unexpected"] == [], out["unexpected"][:3]
    assert out["hangs"] == [] and out["nonfinite"] == [] and out["over_memory"] == [], out
    for kind in MINE:
        assert out["by_class"][kind]["load"]["refused"] > 0, kind
    for kind in ("tied", "memory", "not_regular"):  # refused by the reader itself, not only by load's model check
        assert out["by_class"][kind]["inspect"]["refused"] > 30, (kind, out["by_class"][kind])


@pytest.mark.slow
def test_forged_grids_dtypes_and_non_finite_values_are_refused():
    out = fuzz(30 * len(GRID), 13, *GRID)
    assert out["unexpected"] == [] and out["nonfinite"] == [], (out["unexpected"][:3], out["nonfinite"][:3])
    assert out["hangs"] == [], out["hangs"]
