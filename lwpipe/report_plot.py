"""report.png's picture (lwpipe/report.py writes it): the size waterfall, the quality curve, the per-layer
bars, and the heading that names the run. matplotlib is imported only when a picture is drawn."""

from __future__ import annotations

import math
from pathlib import Path

from lwpipe.loggers.console import format_quality, headline

OPTIONAL = [("latency_ms", "latency ms", ".3g"), ("macs", "MACs", ",.0f")]  # shown when the records have them


def fmt(value, spec: str) -> str:
    """A number, or a latency mapping {batch: ms} as 'b1 0.08 / b256 1.4'."""
    if isinstance(value, dict):
        return " / ".join(f"b{k} {format(v, spec)}" for k, v in value.items())
    return format(value, spec)


def human_bytes(n: float) -> str:
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def _draw_sizes(ax, sizes: list) -> None:
    labels, values = [k for k, _ in sizes], [float(v) for _, v in sizes]
    floor = min(values) / 3
    for i, v in enumerate(values):
        if i == 0 or (i == len(values) - 1 and labels[i] == "model.lwp"):
            ax.bar(i, v - floor, bottom=floor, color="0.55", width=0.6)
        else:
            lo, hi = sorted((values[i - 1], v))
            ax.bar(i, max(hi - lo, hi * 1e-3), bottom=lo, color="C2" if v <= values[i - 1] else "C3", width=0.6)
            ax.plot([i - 1.3, i + 0.3], [values[i - 1]] * 2, color="0.4", lw=0.8, ls=":")
        ax.annotate(
            f"{human_bytes(v)}\n{values[0] / v:.1f}x",
            (i, v),
            xytext=(0, -4 if i else 3),
            textcoords="offset points",
            ha="center",
            va="top" if i else "bottom",
            fontsize=7,
        )
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.set_ylim(floor, values[0] * 2.2)
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(
        range(len(labels)),
        [lb if len(lb) <= 12 else lb[:11] + "~" for lb in labels],
        rotation=30 if len(labels) > 6 else 0,
        ha="right" if len(labels) > 6 else "center",
        fontsize=8,
    )
    ax.set_ylabel("size (log scale)")
    ax.set_title("size after each stage (x: times smaller than fp32)", fontsize=10)
    ax.grid(axis="y", alpha=0.3, which="both")


def _draw_quality(ax, d: dict) -> None:
    metric, pts = d["metric"], [p for p in d["quality"] if p[1] is not None]
    scale = 100.0 if metric == "accuracy" else 1.0
    unit = " (%)" if metric == "accuracy" else ""
    for i, r in enumerate(d["stage_ends"]):
        if i % 2 == 0:
            ax.axvspan(r["step"] - 1, r["step"], color="0.93", lw=0)
        ax.text(
            r["step"] - 0.5,
            1.0,
            r["stage"][:12],
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    xs, ys = [p[0] for p in pts], [p[1] * scale for p in pts]
    ax.plot(xs, ys, color="C0", lw=1, marker=".", ms=3, label="after each epoch")
    ends = [(x, y * scale) for x, y, kind in pts if kind != "epoch"]
    ax.plot(*zip(*ends), "o", color="C1", ms=6, label="baseline / stage end")
    for x, y in ends[1:]:
        ax.annotate(
            format_quality(metric, y / scale),
            (x, y),
            xytext=(-3, 6),
            textcoords="offset points",
            ha="right",
            fontsize=7,
        )
    # zoom on the stage results when an untrained input would flatten them
    end_vals = [y for _, y in ends[1:]] or [y for _, y in ends]
    lo, hi = min(end_vals), max(end_vals)
    pad = max((hi - lo) * 0.6, abs(hi) * 0.02, 1e-9)
    if min(ys) < lo - 4 * pad or max(ys) > hi + 4 * pad:
        ax.set_ylim(lo - 4 * pad, hi + 1.5 * pad)
        ax.text(
            0.01,
            0.98,
            f"zoomed on the stage results; input: {format_quality(metric, ends[0][1] / scale)}",
            transform=ax.transAxes,
            fontsize=7,
            color="0.35",
            va="top",
        )
    ax.margins(y=0.12)
    ax.set_xlim(-0.1, max(xs) + 0.1)
    ax.set_xticks(range(0, math.ceil(max(xs)) + 1))
    ax.set_xlabel("pipeline step (epochs spread over their stage)")
    ax.set_ylabel(f"{metric}{unit}, held-out")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)


def short_name(layer: str, width: int = 30) -> str:
    """'encoder.layer.0.attention.self.query.weight' -> '~layer.0.attention.self.query'
    (the tail tells layers apart)."""
    name = layer.removesuffix(".weight")
    return name if len(name) <= width else "~" + name[-(width - 1) :].lstrip(".")


def _draw_layers(axes, rows: list[dict]) -> None:
    names = [short_name(r["layer"]) for r in rows]
    y = list(range(len(rows)))
    kept = [100 * r["kept"] / max(r["weights"], 1) for r in rows]
    distinct = [max(r["distinct"], 1) for r in rows]
    bits = [r["value_bits"] + r["position_bits"] for r in rows]
    axes[0].barh(y, kept, color="C0")
    axes[0].set_xlabel("weights kept (%)")
    axes[1].barh(y, distinct, color="C4")
    if max(distinct) > 50 * min(distinct):
        axes[1].set_xscale("log")
    axes[1].set_xlabel("distinct non-zero values" + (" (log scale)" if max(distinct) > 50 * min(distinct) else ""))
    axes[2].barh(y, [r["value_bits"] for r in rows], color="C1")
    axes[2].barh(y, [r["position_bits"] for r in rows], left=[r["value_bits"] for r in rows], color="C2")
    axes[2].set_xlabel("coded bits per kept weight\n(orange: value, green: position)")
    for ax, vals, fmt in (
        (axes[0], kept, "{:.1f}%"),
        (axes[1], [r["distinct"] for r in rows], "{:,}"),
        (axes[2], bits, "{:.2f}"),
    ):
        for i, v in enumerate(vals):
            ax.annotate(fmt.format(v), (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(y, names if ax is axes[0] else [""] * len(y), fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    axes[0].set_xlim(0, 118)
    axes[1].set_title("per layer, from model.lwp (Deep Compression's Table 2)", fontsize=10)


def draw(d: dict, path: Path) -> None:
    """Fixed margins in inches rather than a layout engine: constrained layout doubled the drawing time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = d["layers"][:40]  # beyond that the chart stops being readable; report.md lists them all
    heading = title(d)
    width, panel, gap = 12.0, 3.3, 1.05  # inches: top panels, their labels + the next title
    top = 0.4 + 0.22 * len(heading.splitlines())  # the title's lines and the panels' own titles
    layers_h, bottom = (0.3 * len(rows) + 0.2, 0.75) if rows else (0.0, 0.0)
    height = top + panel + (gap + layers_h + bottom if rows else 0.95)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    y_top, y_mid = 1 - top / height, 1 - (top + panel) / height
    upper = fig.add_gridspec(1, 3, left=1.05 / width, right=1 - 0.2 / width, top=y_top, bottom=y_mid, wspace=0.3)
    _draw_sizes(fig.add_subplot(upper[0, 0]), d["sizes"])
    _draw_quality(fig.add_subplot(upper[0, 1:]), d)
    if rows:
        left = max(0.85, 0.3 + 0.065 * max(len(short_name(r["layer"])) for r in rows)) / width
        lower = fig.add_gridspec(
            1, 3, left=left, right=1 - 0.2 / width, top=y_mid - gap / height, bottom=bottom / height, wspace=0.12
        )
        _draw_layers([fig.add_subplot(lower[0, i]) for i in range(3)], rows)
        if len(d["layers"]) > len(rows):
            fig.text(
                0.99,
                0.0,
                f"first {len(rows)} of {len(d['layers'])} layers; report.md lists all",
                ha="right",
                va="bottom",
                fontsize=7,
            )
    fig.suptitle(heading, fontsize=11, y=1 - 0.08 / height)
    fig.savefig(path, format="png", dpi=100)


def short_dtype(record: dict) -> str:
    """The input model's dtype as the report names it: fp32, bf16, fp16 (records before dense_dtype: fp32)."""
    name = record.get("dense_dtype", "float32")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def title(d: dict, picture: bool = True) -> str:
    """The heading: the picture names the recipe and seed, report.md the run directory."""
    name = d["run_dir"].name if d["run_dir"].name else str(d["run_dir"])
    base, last = d["baseline"], d["final"] or (d["stage_ends"][-1] if d["stage_ends"] else d["baseline"])
    metric = d["metric"]
    label = (picture and d.get("label")) or f"{d['run_dir'].parent.name}/{name}"
    text = (
        f"{label}: {metric} {format_quality(metric, headline(base)[1])} -> {format_quality(metric, headline(last)[1])}"
    )
    if last.get("compressed_bytes"):
        text += (
            f", {human_bytes(base['dense_bytes'])} {short_dtype(base)} -> {human_bytes(last['compressed_bytes'])} "
            f"({base['dense_bytes'] / last['compressed_bytes']:.1f}x smaller)"
        )
    text += "" if d["finished"] else "  [run did not finish]"
    speed = [
        f"{h} {fmt(base[k], f)} -> {fmt(last[k], f)}"
        for k, h, f in OPTIONAL
        if base.get(k) is not None and last.get(k) is not None
    ]
    return text + ("\n" + ", ".join(speed) if speed else "")
