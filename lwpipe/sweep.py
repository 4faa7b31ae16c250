"""Sweep summary: summary.csv and pareto.png in a multirun's sweep directory.

Written by `SummaryCallback` at the end of `lwpipe -m ...` (recipes/hydra/default.yaml)
and rebuilt from any sweep directory by `lwpipe-summary DIR`. One row per job:
its overrides, final accuracy, the task's headline `metric` and its value `quality`
(accuracy, perplexity or cosine), compressed_bytes, compression_ratio, sparsity,
seconds and status (completed, failed, or incomplete for a job that was killed).
The Pareto front treats perplexity (and loss) as lower-is-better.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from lwpipe.task_metrics import LOWER_IS_BETTER

log = logging.getLogger("lwpipe")
COLUMNS = [
    "job",
    "overrides",
    "status",
    "accuracy",
    "metric",
    "quality",
    "compressed_bytes",
    "compression_ratio",
    "sparsity",
    "seconds",
    "run_dir",
]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Hydra job directories (they hold .hydra/overrides.yaml), in job order."""
    dirs = [p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml")]
    return sorted(dirs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, str(d)))


def job_row(job_dir: Path, sweep_dir: Path) -> dict:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row = {"job": str(job_dir.relative_to(sweep_dir)), "overrides": " ".join(overrides), "run_dir": str(job_dir)}
    summary = job_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        final = s["final"]
        row.update(
            status="completed",
            seconds=s.get("seconds"),
            **{k: final.get(k) for k in ("accuracy", "compressed_bytes", "compression_ratio", "sparsity")},
            metric=final.get("metric", "accuracy"),
            quality=final.get("quality", final.get("accuracy")),
        )
        if final.get("compression_ratio") is None and final.get("nonzero_params"):
            row["nonzero_ratio"] = final["params"] / final["nonzero_params"]  # until the artifact records sizes
    else:
        row["status"] = "failed" if (job_dir / "FAILED").exists() else "incomplete"
    return row


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both maximised)."""
    return [i for i, (x, y) in enumerate(points) if not any(a >= x and b >= y and (a > x or b > y) for a, b in points)]


def point_labels(rows: list[dict]) -> list[str]:
    """Each job's overrides that differ between jobs, `stages.` dropped: 'prune.sparsity=0.8 share.bits=4'."""
    parts = [r.get("overrides", "").split() for r in rows]
    common = set.intersection(*map(set, parts)) if len(parts) > 1 else set()
    return [
        " ".join(p.removeprefix("stages.") for p in ps if p not in common) or r["job"] for r, ps in zip(rows, parts)
    ]


def place_labels(ax, points: list[tuple[float, float]], labels: list[str]) -> None:
    """Beside each point, at the first offset whose box overlaps no label placed before it."""
    renderer = ax.figure.canvas.get_renderer()
    offsets = [
        (6, 4, "left"),
        (6, -12, "left"),
        (-6, 4, "right"),
        (-6, -12, "right"),
        (6, 16, "left"),
        (6, -24, "left"),
        (-6, 16, "right"),
        (-6, -24, "right"),
        (0, 28, "center"),
        (0, -36, "center"),
    ]
    placed = []
    for (x, y), text in zip(points, labels):
        for dx, dy, ha in offsets:
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=7, color="0.2")
            box = t.get_window_extent(renderer).expanded(1.05, 1.15)
            inside = ax.get_window_extent(renderer).contains(box.x0, box.y0) and ax.get_window_extent(
                renderer
            ).contains(box.x1, box.y1)
            if inside and not any(box.overlaps(b) for b in placed):
                break
            if (dx, dy, ha) != offsets[-1]:
                t.remove()
        placed.append(box)


def plot_pareto(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lwpipe.checkpoint import atomic_write

    xkey = "compression_ratio" if any(r.get("compression_ratio") is not None for r in rows) else "nonzero_ratio"
    ykey = "quality" if any(_number(r.get("quality")) for r in rows) else "accuracy"
    metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy") if ykey == "quality" else "accuracy"
    done = [r for r in rows if r["status"] == "completed" and _number(r.get(xkey)) and _number(r.get(ykey))]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # the front maximises both coordinates
    scale = 100.0 if metric == "accuracy" else 1.0
    points = [(float(r[xkey]), scale * float(r[ykey])) for r in done]
    front = sorted(pareto_front([(x, sign * y) for x, y in points]), key=lambda i: points[i])
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        ax.scatter(*zip(*points), color="0.6", label="job", zorder=2)
        ax.plot(
            [points[i][0] for i in front],
            [points[i][1] for i in front],
            "o-",
            color="C3",
            label="Pareto front",
            zorder=3,
        )
        ax.margins(x=0.25, y=0.2)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        place_labels(ax, points, point_labels(done))
    else:
        ax.text(0.5, 0.5, "no completed job", ha="center", va="center", transform=ax.transAxes)
    failed = sum(r["status"] != "completed" for r in rows)
    ax.set_title(
        f"{len(done)} jobs, labelled by the overrides that differ"
        + (f"; {failed} failed or incomplete" if failed else ""),
        fontsize=10,
    )
    ax.set_xlabel(
        "compression ratio (fp32 bytes / model.lwp bytes)"
        if xkey == "compression_ratio"
        else "params / nonzero params (compression_ratio not recorded)"
    )
    ax.set_ylabel(
        f"final {metric}" + (" (%)" if metric == "accuracy" else "") + (" (lower is better)" if sign < 0 else "")
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_summary(sweep_dir: str | Path) -> list[dict]:
    """Write summary.csv and pareto.png into sweep_dir; returns the rows."""
    from lwpipe.checkpoint import atomic_write  # here: `lwpipe-summary` needs torch only to write

    sweep_dir = Path(sweep_dir)
    rows = [job_row(d, sweep_dir) for d in job_dirs(sweep_dir)]
    columns = COLUMNS + (["nonzero_ratio"] if any("nonzero_ratio" in r for r in rows) else [])

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(sweep_dir / "summary.csv", write_csv)
    plot_pareto(rows, sweep_dir / "pareto.png")
    return rows


class SummaryCallback(Callback):
    """At the end of a multirun: the summary, and exit status 1 when a job failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        log.info("sweep summary: %s", sweep_dir / "summary.csv")
        bad = [r["job"] for r in rows if r["status"] != "completed"]
        if bad:
            print(
                f"lwpipe: {len(bad)} of {len(rows)} jobs failed ({', '.join(bad)}); see {sweep_dir / 'summary.csv'}",
                file=sys.stderr,
            )
            sys.exit(1)


def main() -> None:
    """lwpipe-summary DIR: rebuild summary.csv and pareto.png of a sweep directory."""
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: lwpipe-summary SWEEP_DIR", file=sys.stderr)
        sys.exit(2)
    sweep_dir = Path(sys.argv[1])
    if not sweep_dir.is_dir():
        print(f"lwpipe-summary: {sweep_dir}: no such directory", file=sys.stderr)
        sys.exit(2)
    if not (sweep_dir / "multirun.yaml").is_file():
        print(
            f"lwpipe-summary: {sweep_dir} is not a sweep directory (no multirun.yaml: Hydra writes one "
            "in each `lwpipe -m` sweep directory)",
            file=sys.stderr,
        )
        sys.exit(2)
    if not job_dirs(sweep_dir):
        print(f"lwpipe-summary: {sweep_dir}: no Hydra job directories (.hydra/overrides.yaml) in it", file=sys.stderr)
        sys.exit(2)
    rows = write_summary(sweep_dir)
    for r in rows:
        q = f"{r['quality']:.4f}" if _number(r.get("quality")) else "-"
        print(f"{r['job']:>4}  {r['status']:<10}  {r.get('metric') or 'accuracy'} {q}  {r['overrides']}")
    print(f"wrote {sweep_dir / 'summary.csv'} and {sweep_dir / 'pareto.png'}")
