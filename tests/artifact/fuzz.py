"""Seeded mutations of a real artifact, and a loop that reads each one: refused or loaded, nothing else.

Used by tests/artifact/test_fuzz.py (a child process, ~1,500 cases) and benchmarks/bench_fuzz.py (>= 5,000).
Peak memory is resident set size, per case: the kernel's high-water mark (VmHWM, reset before each case
through /proc/self/clear_refs) minus the resident size before the case. It counts torch's and constriction's
allocations, which tracemalloc does not see.
"""
from __future__ import annotations

import copy
import json
import random
import resource
import time
import traceback
import zlib

import torch

from lwpipe.artifact import ArtifactError
from lwpipe.artifact.decode import build, read
from lwpipe.artifact.format import pack, unpack
from lwpipe.artifact.inspect import format_table

HOSTILE = [0, 1, -1, 2, 3, 7, 255, 2**16, 2**20 + 1, 2**28, 2**31, 2**32 + 5, 10**9, 10**12, 2**63, 2**64, -2**63,
           0.5, float("nan"), 1e308, "", "x", "levels", "float32", "float16", None, True, False, [], {}, [0], [[1]],
           [10**9], [2**31, 2**31], [-1, 4], {"a": 1}, ["float32", 7], ["int8"], ["float16", 10**6]]


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _set(tree, path, value):
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def mutate_header(header: dict, rng: random.Random) -> dict:
    h = copy.deepcopy(header)
    paths = [p for p, _ in _paths(h) if p]
    path = rng.choice(paths)
    parent = h
    for k in path[:-1]:
        parent = parent[k]
    value = parent[path[-1]]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.25 and isinstance(parent, list):
        parent.insert(path[-1], copy.deepcopy(value))  # a duplicated entry
    elif op < 0.55 and isinstance(value, int) and not isinstance(value, bool):
        _set(h, path, rng.choice([value + 1, value - 1, value * 2, value // 2, value * 1000, -value, value + 2**20]))
    else:
        _set(h, path, copy.deepcopy(rng.choice(HOSTILE)))
    return h


def mutate(blob: bytes, rng: random.Random) -> bytes:
    """One mutated file whose checksum matches (a writer made it so): header field, body bits, or raw bytes."""
    header, body = unpack(blob)
    kind = rng.random()
    if kind < 0.5:
        return pack(mutate_header(header, rng), body)
    if kind < 0.85 and body:
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
        return pack(header, bytes(b))
    data = bytearray(blob)
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(4, len(data) - 4)] = rng.randrange(256)
    return bytes(data[:-4]) + zlib.crc32(data[:-4]).to_bytes(4, "little")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: resets VmHWM to the current resident size


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def fuzz(blob: bytes, cases: int, seed: int) -> dict:
    """Read `cases` mutations of blob; counts of each outcome, unexpected errors, slowest case, and the largest
    growth of resident memory during one case."""
    rng = random.Random(seed)
    dense = unpack(blob)[0]["dense_bytes"]
    # torch's one-time set-up of meta -> real materialisation (~35 MiB, once per process) is not the file's doing
    torch.nn.Linear(2, 2, device="meta").to_empty(device="cpu")
    out = {"cases": cases, "loaded": 0, "refused": 0, "unexpected": [], "slowest_s": 0.0, "dense_bytes": dense,
           "peak_rss_growth_bytes": 0}
    for i in range(cases):
        data = mutate(blob, rng)
        reset_peak()
        before = rss_bytes()
        t = time.perf_counter()
        try:
            art = read(data, "case")
            format_table(art)  # what lwpipe-inspect prints
            build(art, source="case")
            out["loaded"] += 1
        except ArtifactError:
            out["refused"] += 1
        except Exception:  # what the test exists to catch
            out["unexpected"].append({"case": i, "error": traceback.format_exc(limit=3)[-1500:]})
        out["slowest_s"] = max(out["slowest_s"], time.perf_counter() - t)
        out["peak_rss_growth_bytes"] = max(out["peak_rss_growth_bytes"], peak_rss_bytes() - before)
    return out


if __name__ == "__main__":  # python -m tests.artifact.fuzz CASES SEED: the child process the test starts
    import sys

    import torch

    from tests.artifact.helpers import CONFIG, model_with
    from lwpipe.artifact import encode_model

    torch.set_num_threads(1)
    blob = encode_model(model_with("pruned+shared+quant+half_bias", "pruned+quant_channel"), CONFIG)
    print(json.dumps(fuzz(blob, int(sys.argv[1]), int(sys.argv[2]))))
