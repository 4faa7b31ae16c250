"""Forged artifacts, one generator per class of hostile file: each returns a file's bytes (a valid checksum,
as a writer who means harm makes it) or, for `not_regular`, the path of something that is not a file.

    tied         malformed `tied` maps: lists, unhashable or numeric values, missing or self names, chains
    dtype        a layer or tensor declared with another dtype (int64, bool, uint8, float16, float64, ...)
    grid_shape   grid scale / zero-point shapes of the right count and the wrong shape ([1]*8, [1, 8], ...)
    memory       a huge declared dense size behind a one-symbol stream; a body far longer than its header needs
    not_regular  a FIFO, /dev/zero, a directory, a 4 GiB sparse file
    constructor  constructor arguments that build millions of modules or labels (ResNet, GPT-2, BERT)
    table        frequency tables of up to 2^21 entries in a file of a few hundred KB
    non_finite   NaN, Inf, 0, negative and 3e38 grid scales; NaN / Inf float16 biases

The test (tests/artifact/test_fuzz.py) and benchmarks/bench_fuzz.py read each one with lwpipe.load and
with lwpipe-inspect's reader.
"""

from __future__ import annotations

import copy
import math
import os
import random
import struct
from pathlib import Path

import numpy as np

from lwpipe.artifact.coding import BitWriter
from lwpipe.artifact.format import pack, unpack


def bases() -> dict[str, bytes]:
    """The real artifacts the generators start from (built once per process)."""
    from lwpipe.artifact import encode_model
    from tests.artifact.helpers import CONFIG, model_with

    return {
        "main": encode_model(model_with("pruned+shared+quant+half_bias", "pruned+quant_channel"), CONFIG),
        # a per-tensor scale first in the raw section, a raw float16 bias last in it
        "grid": encode_model(model_with("quant+half_bias", "pruned+quant_channel+half_bias"), CONFIG),
    }


def tied(base: dict, rng: random.Random) -> bytes:
    h, body = unpack(base["main"])
    names = [e["name"] for e in h["layers"]] + [t[0] for t in h["tensors"]]
    h["tied"] = rng.choice(
        [
            [["9.weight", names[0]]],
            names[0],
            7,
            {"9.weight": [names[0]]},
            {"9.weight": {"a": 1}},
            {"9.weight": None},
            {"9.weight": 3},
            {"9.weight": "nowhere.weight"},
            {names[0]: names[0]},
            {names[0]: names[1]},
            {"9.weight": "8.weight", "8.weight": names[0]},
            {"": names[0]},
            {"9.weight": names[0], "1.weight.x": names[1]},
            {"x" * 300: names[-1]},
        ]
    )
    return pack(h, body)


def dtype(base: dict, rng: random.Random) -> bytes:
    h, body = unpack(base[rng.choice(["main", "grid"])])
    kind = rng.choice(["int64", "bool", "uint8", "int8", "int32", "float16", "float64", "bfloat16", "int16"])
    if rng.random() < 0.7:
        rng.choice(h["layers"])["dtype"] = kind
    else:
        rng.choice(h["tensors"])[3] = kind
    return pack(h, body)


def grid_shape(base: dict, rng: random.Random) -> bytes:
    """Scale and zero-point shapes holding as many elements as stored, in another shape."""
    h, body = unpack(base["main"])
    q = rng.choice([e for e in h["layers"] if e.get("quant")])["quant"]
    n = math.prod(q["scale"][1])
    shape = rng.choice(
        [
            [1] * rng.randint(1, 8) + ([n] if n > 1 else []),
            [n, 1, 1],
            [1, n],
            [n] + [1] * 7,
            [2, n // 2] if n % 2 == 0 else [n],
            list(reversed(q["scale"][1])),
        ]
    )
    for part in rng.choice([["scale"], ["zp"], ["scale", "zp"]]):
        q[part][1] = shape
    if rng.random() < 0.3:
        q["axis"] = rng.choice([0, None])
    return pack(h, body)


def memory(base: dict, rng: random.Random) -> bytes:
    if rng.random() < 0.5:  # one repeated level, 10^9..2^40 times, behind a few bytes
        n = rng.choice([10**9, 10**10, 10**12, 2**40, 3 * 10**9])
        layer = {
            "name": "1.weight",
            "shape": [n],
            "dtype": "float32",
            "quant": {"bits": 8, "qmin": -127, "qmax": 127, "axis": None, "scale": [["float32"], []], "zp": [0, []]},
        }
        bits = one_symbol_table()
        raw = struct.pack("<f", 0.5)
        return pack(
            {
                "model": None,
                "dense_bytes": 4 * n,
                "layers": [layer],
                "tensors": [],
                "sections": [len(raw), len(bits), 0],
            },
            raw + bits,
        )
    h, body = unpack(base["main"])  # a real file padded far beyond what its header could need
    pad = rng.choice([1 << 16, 1 << 20, 4 << 20, 8 << 20])
    part = rng.randrange(3)
    h["sections"][part] += pad
    cut = sum(h["sections"][: part + 1]) - pad
    filler = bytes(pad) if rng.random() < 0.5 else np.random.default_rng(rng.randrange(1 << 30)).bytes(pad)
    return pack(h, body[:cut] + filler + body[cut:])


def not_regular(base: dict, rng: random.Random, folder: Path) -> str:
    kind = rng.choice(["fifo", "dev_zero", "directory", "sparse", "sparse_declared", "symlink_zero"])
    path = folder / f"{kind}-{rng.randrange(1 << 30)}.lwp"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        return "/dev/zero"
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink_zero":
        path.symlink_to("/dev/zero")
    else:
        data = base["main"] if kind == "sparse" else declared_size(base["main"], 4 << 30)
        path.write_bytes(data)
        os.truncate(path, 4 << 30)  # sparse: 4 GiB of length, no blocks
    return str(path)


def declared_size(blob: bytes, size: int) -> bytes:
    """The file's prefix rewritten to declare `size` bytes (the rest of the 4 GiB is the sparse zeros)."""
    from lwpipe.artifact.format import MAGIC, VERSION, _leb128

    return MAGIC + bytes([VERSION]) + _leb128(size) + blob[5 + len(_leb128(len(blob))) :]


def constructor(base: dict, rng: random.Random) -> bytes:
    h, body = unpack(base["main"])
    big = rng.choice([4097, 100_000, 10**6, 10**8, 2**31])
    gpt2 = {"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 2, "vocab_size": 64, "n_positions": 16}
    bert = {
        "model_type": "bert",
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 8,
        "vocab_size": 64,
        "max_position_embeddings": 16,
    }
    key = rng.choice(
        ["resnet_blocks", "resnet_widths", "gpt2_layers", "gpt2_labels", "bert_layers", "lenet_hidden", "tiny_width"]
    )
    if key == "resnet_blocks":
        h["model"] = {"_target_": "lwpipe.models.ResNet", "blocks": rng.choice([big, float(big), 3])}
    elif key == "resnet_widths":
        h["model"] = {"_target_": "lwpipe.models.ResNet", "widths": [4] * rng.choice([big % 400_000, 50, 3])}
    elif key.startswith("gpt2"):
        cfg = gpt2 | ({"n_layer": big} if key == "gpt2_layers" else {"num_labels": big})
        auto = "AutoModelForCausalLM" if key == "gpt2_layers" else "AutoModelForSequenceClassification"
        h["model"] = {"_target_": "lwpipe.models.hf.from_config", "config": cfg, "auto_class": auto}
    elif key == "bert_layers":
        h["model"] = {"_target_": "lwpipe.models.sentence.from_config", "config": bert | {"num_hidden_layers": big}}
    elif key == "lenet_hidden":
        h["model"] = {"_target_": "lwpipe.models.LeNet300", "hidden": [big, big]}
    else:
        h["model"] = copy.deepcopy(h["model"]) | {"hidden": big}
    return pack(h, body)


def table(base: dict, rng: random.Random) -> bytes:
    """A layer of n weights shared over a codebook of n levels, its index table n - 1 one-bit codes."""
    n = rng.choices([1 << 10, 1 << 14, 1 << 17, 1 << 21], weights=[4, 4, 2, 1])[0]  # 2^21: a 512 KB file
    w = BitWriter()
    w.write_exp_golomb(n)  # table size
    w.write(0, 1)  # not uniform
    w.write(20, 5)  # precision
    w.write(0, 4)  # Exp-Golomb order
    w.write((1 << n - 1) - 1, n - 1)  # n - 1 codes "1" (frequency 0): the last symbol takes everything
    w.write(0, n)  # and n one-bit codebook levels
    body_bits = w.getvalue()
    layer = {
        "name": "1.weight",
        "shape": [n],
        "dtype": "float32",
        "quant": {"bits": 1, "qmin": 0, "qmax": 1, "axis": None, "scale": [["float32"], []], "zp": [0, []]},
        "shared": {"k": n, "codebook": "levels"},
    }
    raw = struct.pack("<f", 0.25)
    return pack(
        {
            "model": None,
            "dense_bytes": 4 * n,
            "layers": [layer],
            "tensors": [],
            "sections": [len(raw), len(body_bits), 0],
        },
        raw + body_bits,
    )


def non_finite(base: dict, rng: random.Random) -> bytes:
    """The grid base: its first raw bytes are layer 1's per-tensor float32 scale, its last 16 the float16
    bias of layer 3."""
    h, body = unpack(base["grid"])
    raw = bytearray(body[: h["sections"][0]])
    if rng.random() < 0.6:
        raw[:4] = struct.pack("<f", rng.choice([math.nan, math.inf, -math.inf, 0.0, -0.0, 3e38, -1.0]))
    else:
        values = np.frombuffer(bytes(raw[-16:]), dtype=np.float16).copy()
        values[rng.randrange(8)] = rng.choice([np.nan, np.inf, -np.inf])
        raw[-16:] = values.tobytes()
    return pack(h, bytes(raw) + body[h["sections"][0] :])


def one_symbol_table() -> bytes:
    w = BitWriter()
    w.write_exp_golomb(1)  # a table of one symbol: the stream itself costs nothing
    w.write(0, 1)
    w.write(0, 5)
    w.write(0, 4)
    return w.getvalue()


GENERATORS = {
    "tied": tied,
    "dtype": dtype,
    "grid_shape": grid_shape,
    "memory": memory,
    "not_regular": not_regular,
    "constructor": constructor,
    "table": table,
    "non_finite": non_finite,
}
