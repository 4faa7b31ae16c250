"""Seeded fuzz: 1,500 mutations of a real artifact (header fields, body bits, raw bytes, checksums made to match).

Every one is refused with ArtifactError or loaded; none raises anything else, and the reading process never
grows past 4x the declared dense size plus a fixed allowance. It runs in a child process so that its peak
memory is its own; benchmarks/bench_fuzz.py runs 5,000+ cases and prints the figures.
"""
import json
import subprocess
import sys

ALLOWANCE = 32 << 20  # interpreter, allocator and torch overheads that do not grow with the model


def test_mutated_artifacts_are_refused_or_loaded_within_memory():
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.artifact.fuzz", "1500", "7"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["unexpected"] == [], out["unexpected"][:3]
    assert out["refused"] > 1000 and out["loaded"] > 10  # the mutations reach both outcomes
    assert out["peak_rss_growth_bytes"] < 4 * out["dense_bytes"] + ALLOWANCE, out
