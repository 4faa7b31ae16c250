"""report.png + report.md: a picture of one run, drawn from its own files.

    size       a waterfall from the input model (fp32) through each stage's encoded size to model.lwp
    quality    the task's metric (`quality`/`metric`, else accuracy) at the baseline, every epoch, every stage
    per layer  kept fraction, distinct values, coded bits per kept weight (Deep Compression's Table 2),
               read by decoding the run's model.lwp

Written at the end of every finished run, just before its summary.json, by `ReportLogger`
(logger.report; `logger.report=null` turns it off; a failure warns, the run is not failed) and
again by `lwpipe-report RUN_DIR`. Everything comes from metrics.jsonl, summary.json (the runner
hands it over before writing it) and model.lwp; nothing is recomputed from the model.

The picture names the run by its recipe and seed (recipe.yaml), not by its directory, so that it is
a function of what it shows: a run with the stage cache on keeps report.png in the cache under a key
of everything drawn (plus matplotlib's version, its rc files and lwpipe's source), and a run that
would draw the same picture (an identical rerun) copies it instead of importing matplotlib and drawing
it again (about 1.3 s). report.md, which names the run directory, is always written afresh.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

from lwpipe.errors import LwpipeError
from lwpipe.loggers.console import format_quality, headline

log = logging.getLogger("lwpipe")
OPTIONAL = [("latency_ms", "latency ms", ".3g"), ("macs", "MACs", ",.0f")]  # shown when the records have them


def fmt(value, spec: str) -> str:
    """A number, or a latency mapping {batch: ms} as 'b1 0.08 / b256 1.4'."""
    if isinstance(value, dict):
        return " / ".join(f"b{k} {format(v, spec)}" for k, v in value.items())
    return format(value, spec)


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file() or not path.read_text().strip():
        raise LwpipeError(
            f"{run_dir}: no records (metrics.jsonl missing or empty); a report needs a run "
            "directory whose run logged at least its baseline"
        )
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise LwpipeError(f"{path}:{i}: not a JSON record") from None
    return records


def layer_rows(lwp: Path) -> list[dict]:
    """Per compressed layer of model.lwp: weights, kept, distinct non-zero values, coded bits per kept weight."""
    import torch

    from lwpipe.artifact.decode import read, read_bytes

    art = read(read_bytes(lwp), str(lwp))
    rows = []
    for layer in art.layers:
        with torch.no_grad():
            w = layer.constraint(layer.original.float())
        nz = w[w != 0]
        c, n = layer.cost, max(layer.cost["nnz"], 1)
        rows.append(
            {
                "layer": layer.name,
                "weights": c["weights"],
                "kept": c["nnz"],
                "distinct": int(torch.unique(nz).numel()),
                "value_bits": c["values"] / n,
                "position_bits": c["positions"] / n,
                "bytes": c["total"] / 8,
            }
        )
    return rows


def report_data(run_dir: str | Path, summary: dict | None = None) -> dict:
    """What the report shows, taken from the run's files (tests compare it with them); `summary`: the
    finished run's summary.json, given by the runner before it writes the file."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    if summary is None and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    base = next((r for r in records if r["event"] == "baseline"), records[0])
    ends = [r for r in records if r["event"] == "stage_end"]
    metric = headline(base)[0]
    sizes = [(f"input ({short_dtype(base)})", base.get("dense_bytes"))]
    sizes += [(r["stage"], r.get("compressed_bytes")) for r in ends]
    final = summary["final"] if summary else None
    if final and (run_dir / "model.lwp").is_file():
        sizes.append(("model.lwp", final.get("compressed_bytes")))
    # x: the baseline at 0, stage k's epochs spread over (k-1, k], its stage_end at k
    quality, step_of = [(0.0, headline(base)[1], "baseline")], {r["stage"]: r["step"] for r in ends}
    for r in ends:
        epochs = [e for e in records if e["event"] == "epoch" and e["stage"] == r["stage"]]
        quality += [(r["step"] - 1 + (i + 1) / len(epochs), headline(e)[1], "epoch") for i, e in enumerate(epochs)]
        quality.append((float(r["step"]), headline(r)[1], "stage_end"))
    running = [r for r in records if r["event"] == "epoch" and r["stage"] not in step_of]  # an unfinished stage
    if running:
        k = max(step_of.values(), default=0)
        quality += [(k + (i + 1) / (len(running) + 1), headline(e)[1], "epoch") for i, e in enumerate(running)]
    lwp = run_dir / "model.lwp"
    return {
        "run_dir": run_dir,
        "label": recipe_label(run_dir),
        "metric": metric,
        "baseline": base,
        "stage_ends": ends,
        "final": final,
        "sizes": [(k, v) for k, v in sizes if v is not None],
        "quality": quality,
        "layers": layer_rows(lwp) if lwp.is_file() else [],
        "finished": summary is not None,
    }


def recipe_label(run_dir: Path) -> str | None:
    """'<recipe name>, seed <seed>' from the run's recipe.yaml; None when it cannot be read."""
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        return f"{recipe['name']}, seed {recipe['seed']}"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


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


def drawn(d: dict) -> dict:
    """Everything draw() reads from d: two runs that agree on it get the same picture."""
    return {
        "title": title(d),
        "metric": d["metric"],
        "sizes": d["sizes"],
        "quality": d["quality"],
        "stage_ends": [(r["step"], r["stage"]) for r in d["stage_ends"]],
        "layers": d["layers"],
    }


def picture_key(d: dict) -> str:
    """The stage-cache key of report.png: what it draws, and what draws it."""
    from lwpipe.cache import code_version, digest

    rc = [
        os.environ.get("MATPLOTLIBRC", ""),
        "matplotlibrc",
        os.path.join(os.environ.get("MPLCONFIGDIR", os.path.expanduser("~/.config/matplotlib")), "matplotlibrc"),
    ]
    rc = [Path(f) / "matplotlibrc" if Path(f).is_dir() else Path(f) for f in rc if f]
    return digest(
        "report.png",
        drawn(d),
        version("matplotlib"),
        code_version(),
        [f.read_text(errors="replace") for f in rc if f.is_file()],
    )


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


def markdown(d: dict) -> str:
    metric = d["metric"]
    extra = [(k, h, f) for k, h, f in OPTIONAL if any(r.get(k) is not None for r in [d["baseline"], *d["stage_ends"]])]
    head = [
        "step",
        "stage",
        metric,
        "loss",
        "sparsity",
        "max distinct",
        "teacher agreement",
        "model.lwp bytes",
        "ratio",
        "seconds",
        *[h for _, h, _ in extra],
    ]
    lines = [
        f"# {title(d, picture=False).splitlines()[0]}",
        "",
        *title(d).splitlines()[1:],
        "",
        "![report](report.png)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def cell(v, spec):
        return "-" if v is None else fmt(v, spec)

    for r in [d["baseline"], *d["stage_ends"]]:
        cells = [
            str(r["step"]),
            r["stage"] + (" (cached)" if r.get("cached") else ""),
            format_quality(metric, headline(r)[1]),
            cell(r.get("loss"), ".4f"),
            cell(r.get("sparsity"), ".4f"),
            cell(r.get("max_unique_weights"), "d"),
            cell(r.get("teacher_agreement"), ".4f"),
            cell(r.get("compressed_bytes"), "d"),
            "-" if r.get("compression_ratio") is None else f"{r['compression_ratio']:.1f}x",
            cell(r.get("seconds"), ".2f"),
            *[cell(r.get(k), f) for k, _, f in extra],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if d["layers"]:
        lines += [
            "",
            "Per layer (model.lwp):",
            "",
            "| layer | weights | % kept | distinct | value bits | position bits | bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d["layers"]:
            lines.append(
                f"| {r['layer']} | {r['weights']:,} | {100 * r['kept'] / max(r['weights'], 1):.1f}% | "
                f"{r['distinct']:,} | {r['value_bits']:.2f} | {r['position_bits']:.2f} | {r['bytes']:,.0f} |"
            )
    lines += ["", f"Regenerate with `lwpipe-report {d['run_dir']}`."]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, cache=None, summary: dict | None = None) -> tuple[Path, Path]:
    """Write report.png and report.md; with a StageCache, report.png is copied from it when it holds
    the same picture, and stored in it when drawn."""
    from lwpipe.checkpoint import atomic_write

    run_dir = Path(run_dir)
    d = report_data(run_dir, summary)
    png, md = run_dir / "report.png", run_dir / "report.md"
    key = picture_key(d) if cache is not None and cache.enabled else None
    picture = cache.file(key, ".png") if key else None
    if picture is not None:
        atomic_write(png, lambda tmp: Path(tmp).write_bytes(picture))
    else:
        atomic_write(png, lambda tmp: draw(d, Path(tmp)))
    text = markdown(d)
    atomic_write(md, lambda tmp: Path(tmp).write_text(text))
    if key and picture is None:
        cache.store_records(key, [], {".png": png.read_bytes()})
    return png, md


def run_cache(run_dir: Path):
    """The stage cache the run in run_dir used (its recipe.yaml's cache settings); None when it was off."""
    from lwpipe.cache import StageCache

    try:
        settings = yaml.safe_load((run_dir / "recipe.yaml").read_text()).get("cache")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if isinstance(settings, bool) or not isinstance(settings, dict) or not settings.get("enabled", True):
        return None
    return StageCache(settings.get("dir", "outputs/cache"), True, settings.get("max_bytes"))  # bounded as the run's


class ReportLogger:
    """logger.report: writes the report of a finished run, before its summary.json (a run killed while
    drawing has no summary.json, so it reads as unfinished); an unfinished run gets none."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def log(self, record: dict) -> None:
        pass  # the report reads metrics.jsonl, the run's own record, at the end

    def finish(self, summary: dict) -> None:
        write_report(self.run_dir, run_cache(self.run_dir), summary)

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    """lwpipe-report RUN_DIR: (re)write report.png and report.md of a run directory."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: lwpipe-report RUN_DIR  (a run directory: it holds metrics.jsonl)", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(args[0])
    if (run_dir / "multirun.yaml").is_file():
        print(
            f"lwpipe-report: {run_dir} is a sweep directory; give one job's directory, or run "
            f"`lwpipe-summary {run_dir}` for the sweep's pareto.png",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        png, md = write_report(run_dir)
    except LwpipeError as e:
        print(f"lwpipe-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {png} and {md}")
    return 0


def short_dtype(record: dict) -> str:
    """The input model's dtype as the report names it: fp32, bf16, fp16 (records before dense_dtype: fp32)."""
    name = record.get("dense_dtype", "float32")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)
