"""What a `.lwp` header may declare, checked before anything is allocated.

A file is untrusted input: its header names counts (weights per layer, kept
weights, gap symbols, codebook sizes, tensor shapes) that the decoder would
otherwise allocate blindly, and a count costs the writer nothing (a stream of
one repeated symbol is free). `check_header` checks every field's type and
every count against the layer it belongs to and against the file's declared
dense size, so that decoding needs memory proportional to that size; the
readers (coding.py, raw.py) check what they take against the bytes left.
A layer's grid is parsed and checked as the compressed-weight schema says
(lwpipe/schema.py: `Grid.from_header`, its scale and zero point shapes); once read,
layer_read.read_grid checks that every level of the grid is a finite weight (`Grid.check_values`).
Fields this module does not know are left to the code that reads them.
"""

from __future__ import annotations

import math

from lwpipe.artifact.raw import DTYPES, FLOAT_FIELDS
from lwpipe.schema import MAX_LEVEL, FormError, Grid
from lwpipe.schema import whole as _int

MAX_DIMS = 8
MAX_ESCAPE = 1 << 16
MAX_CODEBOOK = 1 << 16  # a codebook may exceed its layer's weights only up to this (files of lwpipe < 0.2)
LAYER_DTYPES = ("float32", "float64", "float16", "bfloat16")  # a compressed layer's weight is a float
# The body a header can explain: a stored value takes at most 8 bytes (float64) where the dense size counts 4, and
# its position, index or level symbols, scales and tables fit in as much again; buffers are counted at 8 bytes an
# element, and each stored tensor may add a few KB of tables and coder state.
BODY_PER_DENSE_BYTE = 4
ENTRY_BYTES = 8 << 10


MEMORY_FACTOR = 4  # reading takes at most this many times the declared dense size (benchmarks/bench_fuzz.py)


def memory_available() -> int:
    """Bytes this process may use at most: physical memory, or less under an address-space limit."""
    import os
    import resource

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return total if soft == resource.RLIM_INFINITY else min(total, soft)


HeaderError = FormError  # a header field that is missing, of the wrong type, or out of bounds (-> ArtifactError)


def _dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise HeaderError(f"{what} is {type(value).__name__}, not an object")
    return value


def _list(value, what: str) -> list:
    if not isinstance(value, list):
        raise HeaderError(f"{what} is {type(value).__name__}, not a list")
    return value


def check_shape(shape, what: str, limit: int) -> int:
    """The element count of a declared shape; HeaderError unless it is at most `limit`."""
    dims = [_int(s, f"{what} dimension") for s in _list(shape, f"{what} shape")]
    if len(dims) > MAX_DIMS:
        raise HeaderError(f"{what} has {len(dims)} dimensions (at most {MAX_DIMS})")
    n = math.prod(dims)
    if n > limit:
        raise HeaderError(f"{what} declares {n:,} elements, more than the {limit:,} it may hold")
    return n


def check_how(how, what: str) -> None:
    """A stored-tensor description: [dtype], [float dtype, lowest exponent] or ["levels", 8]."""
    how = _list(how, what)
    if how == ["levels", 8]:  # an 8-bit grid (bias: int8): a float32 scale, then the levels
        return
    if len(how) not in (1, 2) or how[0] not in DTYPES:
        raise HeaderError(f"{what} is {how!r}, not a stored dtype description")
    if len(how) == 2:
        fields = FLOAT_FIELDS.get(DTYPES[how[0]])
        if fields is None:
            raise HeaderError(f"{what}: {how[0]} cannot be split into fields")
        _int(how[1], f"{what} lowest exponent", 0, (1 << fields[0]) - 1)


def check_grid(q, what: str, shape: list[int]) -> int:
    """The grid's level span qmax - qmin (>= 1): the schema's grid (lwpipe/schema.Grid.from_header) and the
    stored descriptions of its scale and zero point."""
    grid = Grid.from_header(q, shape, what)
    want = grid.scale_shape(shape)
    for part in ("scale", "zp"):
        declared = q[part][1]
        check_shape(declared, f"{what} {part}", math.prod(want))
        grid.check_shapes({part: declared}, shape, what)
    scale_how, mode = q["scale"][0], q["zp"][0]
    check_how(scale_how, f"{what} scale")
    if isinstance(mode, int) and not isinstance(mode, bool):
        _int(mode, f"{what} zero point", -MAX_LEVEL, MAX_LEVEL)
    elif mode != "levels":
        check_how(mode, f"{what} zero point")
    return grid.qmax - grid.qmin


def check_layer(e, i: int, budget: int) -> int:
    """The layer's weight count; HeaderError when any of its fields is out of bounds."""
    what = f"layer {i}"
    e = _dict(e, what)
    if not isinstance(e.get("name"), str):
        raise HeaderError(f"{what} has no name")
    what = f"layer {e['name']!r}"
    shape = e.get("shape")
    numel = check_shape(shape, what, budget)
    if e.get("dtype") not in LAYER_DTYPES:
        raise HeaderError(
            f"{what} has dtype {e.get('dtype')!r}; a compressed layer is one of {', '.join(LAYER_DTYPES)}"
        )
    if e.get("shared") is not None and e["dtype"] not in ("float32", "bfloat16", "float16"):
        raise HeaderError(
            f"{what} has dtype {e['dtype']!r}; a shared layer computes from a float32 codebook, in float32, "
            f"bfloat16 or float16"
        )
    if e.get("mask") is not None:
        m = _dict(e["mask"], f"{what} mask")
        nnz = _int(m.get("nnz"), f"{what} kept weights", 0, numel)
        escape = m.get("escape")
        if escape is not None:
            _int(escape, f"{what} escape", 1, MAX_ESCAPE)
        # every escape symbol stands for `escape` pruned weights, so there are at most numel // escape of them
        _int(m.get("gaps"), f"{what} gap symbols", nnz, nnz if escape is None else nnz + numel // escape)
    span = check_grid(e["quant"], f"{what} grid", shape) if e.get("quant") is not None else None
    if e.get("shared") is not None:
        s = _dict(e["shared"], f"{what} codebook")
        _int(s.get("k"), f"{what} codebook size", 1, max(numel, MAX_CODEBOOK))
        if s.get("codebook") == "levels":
            if span is None or e["quant"].get("axis") is not None:
                raise HeaderError(f"{what}: a codebook of levels needs a per-tensor grid")
        else:
            check_how(s.get("codebook"), f"{what} codebook")
    elif span is None or "values" in e:
        check_how(e.get("values"), f"{what} values")
    return numel


def check_header(header: dict, body_len: int, max_dense_bytes: int | None = None) -> None:
    """HeaderError naming the first field that is malformed or declares more than the file can hold."""
    dense = _int(header.get("dense_bytes"), "dense_bytes")
    if max_dense_bytes is not None and dense > max_dense_bytes:
        raise HeaderError(f"the model's dense size is {dense:,} bytes, above the limit of {max_dense_bytes:,}")
    if max_dense_bytes is None and MEMORY_FACTOR * dense > memory_available():
        raise HeaderError(
            f"the model's dense size is {dense:,} bytes: reading it takes up to {MEMORY_FACTOR}x that, "
            f"more than the {memory_available():,} bytes of memory this process may use "
            "(max_dense_bytes= / --max-dense-bytes sets the limit instead)"
        )
    if header.get("model") is not None:
        _dict(header["model"], "model config")
    sections = _list(header.get("sections"), "sections")
    if len(sections) != 3 or sum(_int(n, "section length") for n in sections) != body_len:
        raise HeaderError(f"sections {sections!r} do not add up to the body's {body_len} bytes")
    budget, names = dense // 4, set()  # weights the declared dense size allows, over all layers
    for i, e in enumerate(_list(header.get("layers"), "layers")):
        budget -= check_layer(e, i, budget)
        if e["name"] in names:
            raise HeaderError(f"layer {e['name']!r} is stored twice")
        names.add(e["name"])
    buffers = 0  # bytes of non-parameter tensors (BatchNorm statistics): the dense size does not count them
    for i, t in enumerate(_list(header.get("tensors"), "tensors")):
        t = _list(t, f"tensor {i}")
        if len(t) < 4 or not isinstance(t[0], str) or t[3] not in DTYPES or t[0] in names:
            raise HeaderError(f"tensor {i} is {str(t)[:80]}, not [name, how, shape, dtype, ...] with a new name")
        check_how(t[1], f"tensor {t[0]!r}")
        # stored bytes bound a tensor: at least 7 bits of each element (bfloat16's mantissa) are in the body
        n = check_shape(t[2], f"tensor {t[0]!r}", 8 * body_len // 7)
        buffers += 8 * n if "buffer" in t[4:] else 0
        names.add(t[0])
    check_tied(header.get("tied"), names)
    most = BODY_PER_DENSE_BYTE * dense + buffers + ENTRY_BYTES * (1 + len(names))
    if body_len > most:
        raise HeaderError(
            f"the body is {body_len:,} bytes, more than the {most:,} its declared content can take "
            f"({dense:,} dense bytes, {len(names)} tensors)"
        )


def check_tied(tied, names: set[str]) -> None:
    """`tied` maps another name of a module's weight to the stored tensor it computes with."""
    if tied is None:
        return
    for alias, name in _dict(tied, "tied").items():
        if not isinstance(name, str):
            raise HeaderError(f"tied[{alias!r}] is {str(name)[:40]}, not the name of a stored tensor")
        if alias in names or alias == name:
            raise HeaderError(f"tied[{alias!r}]: {alias!r} is itself stored, it cannot be tied to {name!r}")
        if name not in names:
            raise HeaderError(f"tied[{alias!r}] is {name!r}, which the file does not store")


# -- model construction ----------------------------------------------------------------------------------------
LAYER_COUNTS = (
    "n_layer",
    "n_layers",
    "num_layers",
    "num_hidden_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "encoder_layers",
    "decoder_layers",
    "blocks",
)
LABEL_COUNTS = ("num_labels",)
SMALL_INT = 4096  # token ids, generation settings and the like: any int up to this is let through


def check_arguments(cls, config: dict, header: dict) -> None:
    """HeaderError unless every constructor argument fits what the file stores, checked BEFORE constructing
    (on the meta device a module costs no memory, but a million of them still take minutes).

    A count of layers or blocks is at most the number of tensors the file stores (each layer stores at least
    one); a label count at most the largest stored dimension (the head stores one row a label); any other
    whole number at most max(4 x the largest stored dimension, the declared weight count, 4,096); a list or
    object at most as long as that. A model class may bound itself further (`least_tensors`)."""
    shapes = [list(e["shape"]) for e in header["layers"]] + [list(t[2]) for t in header["tensors"]]
    entries = len(shapes) + len(header.get("tied") or {})
    widest = max((d for s in shapes for d in s), default=0)
    limit = max(4 * widest, entries, SMALL_INT)
    for path, value in _walk(config, "model"):
        key = path.rpartition(".")[2]
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise HeaderError(
                f"{path} has {len(value):,} entries, more than the {limit:,} the file's {entries} tensors can use"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        most = entries if key in LAYER_COUNTS else widest if key in LABEL_COUNTS else limit
        if value > most:
            raise HeaderError(
                f"{path} is {value:,}, more than the {most:,} the file's {entries} stored tensors "
                f"(largest dimension {widest:,}) can hold"
            )
    least = getattr(cls, "least_tensors", None)
    if least is not None:
        need = least({k: v for k, v in config.items() if k != "_target_"})
        if need > entries:
            raise HeaderError(
                f"model {config.get('_target_')} with these arguments has at least {need:,} "
                f"tensors, the file stores {entries}"
            )


def _walk(node, path: str):
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _walk(v, f"{path}.{k}")
