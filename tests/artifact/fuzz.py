"""Seeded hostile files, and a loop that reads each one with lwpipe.load and with lwpipe-inspect's reader:
refused (ArtifactError) or loaded, nothing else, within a time limit per file, in a process limited to 3 GiB of
address space.

Classes: "mutation" (header fields, body bits and raw bytes of a real artifact, checksum fixed) and one
generator per class of tests/artifact/forge.py. Used by tests/artifact/test_fuzz.py (child processes) and
benchmarks/bench_fuzz.py (>= 10,000 cases a reader).
Peak memory is resident set size, per read: the kernel's high-water mark (VmHWM, reset before each read
through /proc/self/clear_refs) minus the resident size before it. It counts torch's and constriction's
allocations, which tracemalloc does not see.
"""

from __future__ import annotations

import copy
import json
import random
import resource
import signal
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import torch

import lwpipe
from lwpipe.artifact import ArtifactError
from lwpipe.artifact.format import pack, unpack
from lwpipe.artifact.inspect import describe
from tests.artifact import forge

CLASSES = ("mutation", *forge.GENERATORS)
READERS = {"load": lwpipe.load, "inspect": describe}  # describe: all lwpipe-inspect does but print
ADDRESS_SPACE = 3 << 30
ALLOWANCE = 32 << 20  # interpreter, allocator and torch overheads that do not grow with the model

HOSTILE = [
    0,
    1,
    -1,
    2,
    3,
    7,
    255,
    2**16,
    2**20 + 1,
    2**28,
    2**31,
    2**32 + 5,
    10**9,
    10**12,
    2**63,
    2**64,
    -(2**63),
    0.5,
    float("nan"),
    1e308,
    "",
    "x",
    "levels",
    "float32",
    "float16",
    None,
    True,
    False,
    [],
    {},
    [0],
    [[1]],
    [10**9],
    [2**31, 2**31],
    [-1, 4],
    {"a": 1},
    ["float32", 7],
    ["int8"],
    ["float16", 10**6],
]


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


def limit_address_space(limit: int = ADDRESS_SPACE) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


class CaseTimeout(BaseException):
    """Raised by the per-file alarm; a BaseException, so no `except Exception` in the reader swallows it."""


def _alarm(signum, frame):
    raise CaseTimeout()


def make_case(kind: str, blob: bytes, bases: dict, rng: random.Random, folder: Path, i: int) -> str:
    if kind == "not_regular":
        return forge.not_regular(bases, rng, folder)
    data = mutate(blob, rng) if kind == "mutation" else forge.GENERATORS[kind](bases, rng)
    path = folder / f"case{i % 16}.lwp"
    path.write_bytes(data)
    return str(path)


def declared_dense(path: str, default: int) -> int:
    try:
        return int(unpack(Path(path).read_bytes())[0]["dense_bytes"]) if Path(path).is_file() else default
    except Exception:
        return default


def read_case(path: str, reader: str, time_limit: float) -> str:
    """loaded, refused, hang, nonfinite (loaded with NaN/Inf weights), or the traceback of anything else."""
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        model = READERS[reader](path)
        if reader == "load" and not all(
            bool(t.isfinite().all()) for t in model.state_dict().values() if t.is_floating_point()
        ):
            return "nonfinite"  # loaded silently with NaN or Inf weights
        return "loaded"
    except ArtifactError:
        return "refused"
    except CaseTimeout:
        return "hang"
    except Exception:  # what the fuzz exists to catch
        return traceback.format_exc(limit=4)[-1500:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def fuzz(blob: bytes, cases: int, seed: int, classes=CLASSES, readers=tuple(READERS), time_limit: float = 20.0) -> dict:
    """Read `cases` hostile files (classes in turn) with each reader; counts of each outcome per class and
    reader, the unexpected errors and hangs, the slowest read, and the largest growth of resident memory
    during one read (and any read that grew past 4 x its declared dense size + ALLOWANCE)."""
    rng, bases = random.Random(seed), forge.bases()
    dense = unpack(blob)[0]["dense_bytes"]
    torch.nn.Linear(2, 2, device="meta").to_empty(device="cpu")  # torch's one-time meta set-up (~35 MiB)
    signal.signal(signal.SIGALRM, _alarm)
    counts = {
        c: {r: {"loaded": 0, "refused": 0, "unexpected": 0, "hang": 0, "nonfinite": 0} for r in readers}
        for c in classes
    }
    out = {
        "cases": cases,
        "by_class": counts,
        "unexpected": [],
        "hangs": [],
        "nonfinite": [],
        "over_memory": [],
        "dense_bytes": dense,
        "slowest_s": {r: 0.0 for r in readers},
        "peak_rss_growth_bytes": 0,
        "address_space_limit": resource.getrlimit(resource.RLIMIT_AS)[0],
        "time_limit_s": time_limit,
    }
    with tempfile.TemporaryDirectory() as folder:
        for i in range(cases):
            kind = classes[i % len(classes)]
            path = make_case(kind, blob, bases, rng, Path(folder), i)
            bound = 4 * declared_dense(path, dense) + ALLOWANCE
            for reader in readers:
                reset_peak()
                before, t = rss_bytes(), time.perf_counter()
                result = read_case(path, reader, time_limit)
                seconds, growth = time.perf_counter() - t, peak_rss_bytes() - before
                key = result if result in ("loaded", "refused", "hang", "nonfinite") else "unexpected"
                counts[kind][reader][key] += 1
                case = {"case": i, "class": kind, "reader": reader}
                if key == "unexpected":
                    out["unexpected"].append(case | {"error": result})
                elif key in ("hang", "nonfinite"):
                    out["hangs" if key == "hang" else "nonfinite"].append(case)
                if growth > bound:
                    out["over_memory"].append(case | {"growth": growth, "bound": bound})
                out["slowest_s"][reader] = max(out["slowest_s"][reader], seconds)
                out["peak_rss_growth_bytes"] = max(out["peak_rss_growth_bytes"], growth)
    return out


if __name__ == "__main__":  # python -m tests.artifact.fuzz CASES SEED [CLASS ...]: the child process of the test
    import sys

    from lwpipe.artifact import encode_model
    from tests.artifact.helpers import CONFIG, model_with

    torch.set_num_threads(1)
    limit_address_space()
    blob = encode_model(model_with("pruned+shared+quant+half_bias", "pruned+quant_channel"), CONFIG)
    print(json.dumps(fuzz(blob, int(sys.argv[1]), int(sys.argv[2]), tuple(sys.argv[3:]) or CLASSES)))
