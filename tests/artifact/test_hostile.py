"""Files written to hurt the reader (valid checksums, hostile counts): each is refused quickly, in one line.

Each case is one the review reproduced against lwpipe 0.1 (gigabytes of memory, a Rust panic or an endless
loop from a file of a few KB); here lwpipe-inspect and lwpipe.load each read it in a child process capped at
1 GiB of address space above its start, so a regression fails the test instead of taking the machine down.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from lwpipe.artifact import ArtifactError, encode_model, read
from lwpipe.artifact.coding import BitWriter
from lwpipe.artifact.format import pack, pack_json, unpack
from tests.artifact.forge import one_symbol_table
from tests.artifact.helpers import CONFIG, model_with

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import lwpipe, torch
    from lwpipe.artifact import ArtifactError
    from lwpipe.artifact.inspect import describe
    vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = {}
    for path in sys.argv[1:]:
        t = time.perf_counter()
        for reader, read in (('inspect', describe), ('load', lwpipe.load)):
            try:
                read(path)
                out[f'{path} {reader}'] = 'LOADED'
            except ArtifactError as e:
                out[f'{path} {reader}'] = 'REFUSED ' + str(e)
        out[path + ' seconds'] = time.perf_counter() - t
    print(json.dumps(out))
""")


def read_all(tmp_path, cases: dict[str, bytes | str]) -> dict[str, dict]:
    """Each file (bytes to write, or the path of an existing one) read by lwpipe-inspect's describe and by
    lwpipe.load in one child process capped at 1 GiB above its start: case -> {inspect, load: outcome}."""
    paths = {}
    for name, data in cases.items():
        paths[name] = data if isinstance(data, str) else tmp_path / f"{name}.lwp"
        if not isinstance(data, str):
            paths[name].write_bytes(data)
    p = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, paths.values())], capture_output=True, text=True, timeout=150
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    out = json.loads(p.stdout)
    return {
        name: {r: out[f"{path} {r}"] for r in ("inspect", "load")} | {"seconds": out[f"{path} seconds"]}
        for name, path in paths.items()
    }


def refusals(tmp_path, cases: dict[str, bytes], reader: str = "inspect") -> dict[str, str]:
    """Each file refused by `reader` and by lwpipe.load, without hanging; case -> `reader`'s refusal."""
    got = read_all(tmp_path, cases)
    for name, out in got.items():
        assert out[reader].startswith("REFUSED") and out["load"].startswith("REFUSED"), (name, out)
        assert out["seconds"] < 60, name  # a hang, not a slow machine (bench_fuzz.py times them)
    return {name: out[reader] for name, out in got.items()}


def mask_layer(shape, nnz, gaps, escape=None, **extra):
    return {
        "name": "0.weight",
        "shape": shape,
        "dtype": "float32",
        "mask": {"nnz": nnz, "gaps": gaps, "escape": escape},
        "values": ["float32"],
        **extra,
    }


def crafted(
    layers, bits: bytes = b"", raw: bytes = b"", words: bytes = b"", tensors=(), dense_bytes=64, model=None
) -> bytes:
    header = {
        "model": model,
        "dense_bytes": dense_bytes,
        "layers": layers,
        "tensors": list(tensors),
        "sections": [len(raw), len(bits), len(words)],
    }
    return pack(header, raw + bits + words)


def table_bits(size: int, uniform: bool) -> bytes:
    w = BitWriter()
    w.write_exp_golomb(size)
    w.write(uniform, 1)
    if not uniform:
        w.write(20, 5)
        w.write(0, 4)
    w.write(0, 4000)  # some body for the reader to chew on
    return w.getvalue()


@pytest.fixture(scope="module")
def blob() -> bytes:
    return encode_model(model_with("pruned+shared+quant+half_bias", "pruned+quant_channel"), CONFIG)


def grid_layer(qmin: int, qmax: int, k: int, zp_levels: int | None = None) -> dict:
    grid = {"bits": 8, "qmin": qmin, "qmax": qmax, "axis": None, "scale": [["float32"], []], "zp": [0, []]}
    if zp_levels is not None:
        grid["zp"] = ["levels", [zp_levels]]
        return {"name": "0.weight", "shape": [4, 4], "dtype": "float32", "quant": grid}
    return {
        "name": "0.weight",
        "shape": [4, 4],
        "dtype": "float32",
        "quant": grid,
        "shared": {"k": k, "codebook": "levels"},
    }


@pytest.mark.slow
def test_hostile_files_are_refused_quickly_within_memory(tmp_path, blob):
    header, body = unpack(blob)
    header["model"]["in_features"] = 5_000_000  # a 1.3 GB first layer, if it were built
    wide = pack(header, body)
    big = ["0.bias", ["float32", 100], [10**9], "float32"]
    cases = {  # name: (file, a word the refusal must contain)
        "uniform table of 2^28 symbols": (
            crafted([mask_layer([4, 4], 2, 2)], bits=table_bits(1 << 28, True)),
            "frequency table",
        ),
        "table of 2^28 frequencies": (
            crafted([mask_layer([4, 4], 2, 2)], bits=table_bits(1 << 28, False)),
            "frequency table",
        ),
        "one symbol, 2e8 gaps": (crafted([mask_layer([4, 4], 2, 2 * 10**8, 3)], bits=one_symbol_table()), "gap"),
        "one symbol, 1e12 gaps": (crafted([mask_layer([4, 4], 2, 10**12, 3)], bits=one_symbol_table()), "gap"),
        "bias of 1e9 from 4 KB": (crafted([], bits=table_bits(2, True), raw=bytes(4000), tensors=[big]), "elements"),
        "qmin == qmax, k=1e10": (crafted([grid_layer(0, 0, 10**10)], bits=one_symbol_table(), raw=bytes(4)), "qmin"),
        "1-bit levels, k=1e10": (
            crafted([grid_layer(0, 1, 10**10)], bits=one_symbol_table(), raw=bytes(4)),
            "codebook size",
        ),
        "1-bit levels, k=60000": (
            crafted(
                [grid_layer(0, 1, 60_000)], bits=one_symbol_table(), raw=bytes.fromhex("0000803f")
            ),  # scale 1.0: a zero one is refused first
            "levels of 1 bits",
        ),
        "1e10 zero-point levels": (crafted([grid_layer(0, 1, 0, 10**10)], raw=bytes(4)), "elements"),
        "layer of 1e9 weights": (crafted([mask_layer([10**9], 1, 1)], bits=table_bits(2, True)), "elements"),
        "header inflating to 64 MB": (pack_json(b'{"pad":"' + b" " * (64 << 20) + b'"}', b""), "inflates"),
        "header nested 200,000 deep": (pack_json(b"[" * 200_000 + b"]" * 200_000, b""), "nested too deeply"),
    }
    got = refusals(tmp_path, {name: data for name, (data, _) in cases.items()})
    for name, (_, word) in cases.items():
        assert word in got[name], (name, got[name])
    assert "model.in_features is 5,000,000" in refusals(tmp_path, {"in_features=5e6": wide}, "load")["in_features=5e6"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("dense_bytes", "many"),
        ("layers", {"a": 1}),
        ("tensors", [[1, 2]]),
        ("sections", [1, 2]),
        ("layers.0.shape", [-3, 4]),
        ("layers.0.mask", [1]),
        ("layers.0.quant.axis", 3),
        ("layers.0.shared.k", True),
        ("tensors.0.1", ["float32", 10**6]),
        ("tensors.0.2", [[2]]),
    ],
)
def test_fields_of_the_wrong_type_or_range(blob, field, value):
    header, body = unpack(blob)
    *path, last = field.split(".")
    node = header
    for p in path:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(last) if isinstance(node, list) else last] = value
    with pytest.raises(ArtifactError, match="cannot be decoded"):
        read(pack(header, body))


@pytest.mark.slow
def test_inspect_into_a_closed_pipe(tmp_path, blob):
    path = tmp_path / "model.lwp"
    path.write_bytes(blob)
    code = (
        f"import os; r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
        f"from lwpipe.artifact.inspect import main; main([{str(path)!r}])"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_pack_json_is_what_pack_writes(blob):
    header, body = unpack(blob)
    assert pack_json(json.dumps(header, separators=(",", ":")).encode(), body) == blob


def test_max_dense_bytes_refuses_a_file_that_declares_more(tmp_path, blob):
    import lwpipe

    path = tmp_path / "model.lwp"
    path.write_bytes(blob)
    dense = unpack(blob)[0]["dense_bytes"]
    with pytest.raises(ArtifactError, match=f"dense size is {dense:,} bytes, above the limit of 1,000"):
        lwpipe.load(path, max_dense_bytes=1000)
    lwpipe.load(path, max_dense_bytes=dense)
