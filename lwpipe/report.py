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
import os
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

from lwpipe.errors import LwpipeError
from lwpipe.loggers.console import format_quality, headline
from lwpipe.report_plot import OPTIONAL, draw, fmt, human_bytes, short_dtype, short_name, title  # noqa: F401  (re-exported)

log = logging.getLogger("lwpipe")


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

    from lwpipe.metrics import distinct_16bit
    from lwpipe.verify import stored_layers

    rows = []
    for layer in stored_layers(lwp):  # one layer in memory at a time
        with torch.no_grad():
            if layer.original.dtype in (torch.bfloat16, torch.float16):  # as it computes: a histogram of its bits
                distinct = distinct_16bit(layer.constraint(layer.original))
            else:
                w = layer.constraint(layer.original.float())
                distinct = int(torch.unique(w[w != 0]).numel())
        c, n = layer.cost, max(layer.cost["nnz"], 1)
        rows.append(
            {
                "layer": layer.name,
                "weights": c["weights"],
                "kept": c["nnz"],
                "distinct": distinct,
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
