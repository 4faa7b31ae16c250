"""`lwpipe-inspect model.lwp`: what each layer costs, in the shape of Deep Compression's Table 2.

    weight bits  coded bits per kept weight of its value (codebook index or grid level, table included)
    index bits   coded bits per kept weight of its position (relative gaps, table included)
    bytes        everything the layer takes: positions, values, codebook, scales
    % of orig.   bytes / the tensor's dense float32 bytes

The file is fully decoded (so a damaged one is caught) but no model is built.
"""

from __future__ import annotations

import argparse
import os
import sys

from lwpipe.artifact.decode import Artifact, constructor, read, read_bytes
from lwpipe.artifact.format import unpack
from lwpipe.errors import LwpipeError
from lwpipe.schema import WeightForm

COLUMNS = [
    ("layer", 16, "<"),
    ("weights", 9, ">"),
    ("% kept", 7, ">"),
    ("weight bits", 11, ">"),
    ("index bits", 10, ">"),
    ("bytes", 8, ">"),
    ("% of orig.", 10, ">"),
    ("encoding", 0, "<"),
]


def encoding(form: WeightForm) -> str:
    """The layer's compressed form in words (lwpipe/schema.py): pruned, shared, its grid's bits and granularity."""
    parts = ["pruned"] if form.mask else []
    if form.codebook:
        parts.append(f"shared k={form.codebook}")
    q = form.grid
    if q is not None:
        kind = f"per-group of {q.group}" if q.group else "per-tensor" if q.axis is None else "per-channel"
        parts.append(f"{q.bits}-bit {kind}")  # Conv1D's per-channel axis is 1
    return " + ".join(parts)


def rows(art: Artifact) -> list[dict]:
    """One row per stored tensor, then the container (header, checksum, coder flush) and the total."""
    also: dict[str, list[str]] = {}  # stored name -> the other (tied) names that compute with it
    for alias, name in (art.header.get("tied") or {}).items():
        also.setdefault(name, []).append(alias)
    layers = []
    for layer in art.layers:
        c, n = layer.cost, max(layer.cost["nnz"], 1)
        layers.append(
            {
                "layer": layer.name,
                "weights": c["weights"],
                "kept": c["nnz"],
                "weight_bits": c["values"] / n,
                "index_bits": c["positions"] / n if layer.form.mask else None,
                "bytes": round(c["total"] / 8),
                "encoding": encoding(layer.form) + _tied(also, layer.name),
            }
        )
    others = _tensor_rows(art, also)
    kept = sum(r["kept"] for r in layers)
    container = {
        "layer": "(container)",
        "weights": None,
        "kept": None,
        "weight_bits": None,
        "index_bits": None,
        "bytes": art.size - sum(r["bytes"] for r in layers + others),
        "encoding": "header, checksum, coder flush",
    }
    total = {
        "layer": "total",
        "weights": art.header["dense_bytes"] // 4,
        "kept": None,
        "weight_bits": sum(r["weight_bits"] * r["kept"] for r in layers) / max(kept, 1),
        "index_bits": sum((r["index_bits"] or 0) * r["kept"] for r in layers) / max(kept, 1),
        "bytes": art.size,
        "encoding": f"{art.header['dense_bytes'] / art.size:.1f}x smaller than float32",
    }
    # the share of EVERY parameter that is kept (non-zero), so untouched tensors show (a tied one counts once)
    total["kept_share"] = (kept + sum(r["kept"] or 0 for r in others)) / max(art.header["dense_bytes"] // 4, 1)
    return layers + others + [container, total]


def _tensor_rows(art: Artifact, also: dict[str, list[str]]) -> list[dict]:
    """One row per stored tensor that is not a compressed layer (biases, norms, buffers)."""
    others = []
    for name, how, _, _, *flags in art.header["tensors"]:
        value, bits = art.tensors[name][0], art.tensor_bits[name]
        numel = value.numel()
        kept = None if "buffer" in flags else int(value.count_nonzero())  # a buffer is not a parameter
        others.append(
            {
                "layer": name,
                "weights": numel,
                "kept": kept,
                "weight_bits": bits / max(numel, 1),
                "index_bits": None,
                "bytes": round(bits / 8),
                "encoding": (
                    "8-bit grid, levels coded"
                    if how[0] == "levels"
                    else how[0] + (", sign+exponent coded" if len(how) > 1 else "")
                )
                + _tied(also, name),
            }
        )
    return others


def _tied(also: dict, name: str) -> str:
    return f" (also {', '.join(also[name])}: tied, stored once)" if name in also else ""


def format_table(art: Artifact) -> str:
    table = rows(art)
    # the layer column fits the longest name, so a transformer's long module names keep the columns aligned
    columns = [(COLUMNS[0][0], max(COLUMNS[0][1], *(len(r["layer"]) for r in table)), "<"), *COLUMNS[1:]]
    lines = ["  ".join(f"{h:{a}{w}}" for h, w, a in columns).rstrip()]
    for r in table:
        dense = art.header["dense_bytes"] if r["layer"] == "total" else 4 * (r["weights"] or 0)
        share = r.get("kept_share", None if r["kept"] is None else r["kept"] / max(r["weights"], 1))
        cells = [
            r["layer"],
            "" if r["weights"] is None else f"{r['weights']:,}",
            "" if share is None else f"{100 * share:.1f}%",
            "" if r["weight_bits"] is None else f"{r['weight_bits']:.2f}",
            "-" if r["index_bits"] is None else f"{r['index_bits']:.2f}",
            f"{r['bytes']:,}",
            f"{100 * r['bytes'] / dense:.2f}%" if dense else "",
            r["encoding"],
        ]
        lines.append("  ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(cells, columns)).rstrip())
    return "\n".join(lines)


def describe(path: str, trusted: bool = False, max_dense_bytes: int | None = None) -> str:
    """The report lwpipe-inspect prints; the file is read under lwpipe.load's limits (ArtifactError)."""
    data = read_bytes(path, max_dense_bytes)
    header, _ = unpack(data, path, view=True)
    model = "no config stored (load it with module=)"
    if header.get("model") is not None:
        constructor(header, trusted, path)
        cfg = dict(header["model"])
        model = f"{cfg.pop('_target_')}({', '.join(f'{k}={_short(v)}' for k, v in cfg.items())})"
    art = read(data, path, max_dense_bytes)
    return (
        f"{path}: lwpipe artifact, format version {data[4]}, {art.size:,} bytes, checksum ok\n"
        f"model: {model}\n\n" + format_table(art)
    )


def _short(value) -> str:
    """A transformers config is ~40 keys: name its model type and size, not every key, on the model line."""
    if isinstance(value, dict) and len(value) > 6:
        keep = [k for k in ("model_type", "architectures") if k in value]
        return "{" + "".join(f"{k!r}: {value[k]!r}, " for k in keep) + f"... {len(value)} keys}}"
    return repr(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lwpipe-inspect", description="Per-layer sizes of a compressed model.lwp.")
    p.add_argument("path", help="a model.lwp file")
    p.add_argument(
        "--trusted",
        action="store_true",
        help="accept a model constructor outside lwpipe.models (inspect never builds the model)",
    )
    p.add_argument(
        "--max-dense-bytes",
        type=int,
        default=None,
        metavar="N",
        help="refuse a file that declares a model of more than N dense bytes",
    )
    a = p.parse_args(argv)
    try:
        text = describe(a.path, a.trusted, a.max_dense_bytes)
    except LwpipeError as e:
        print(f"lwpipe-inspect: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `lwpipe-inspect FILE | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail
    return 0
