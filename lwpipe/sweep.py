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

log = logging.getLogger("lwpipe")
COLUMNS = ["job", "overrides", "status", "accuracy", "metric", "quality", "compressed_bytes", "compression_ratio",
           "sparsity", "seconds", "run_dir"]
LOWER_IS_BETTER = {"perplexity", "loss"}


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Hydra job directories (they hold .hydra/overrides.yaml), in job order."""
    dirs = [p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml")]
    return sorted(dirs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, str(d)))


def job_row(job_dir: Path, sweep_dir: Path) -> dict:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row = {"job": str(job_dir.relative_to(sweep_dir)), "overrides": " ".join(overrides),
           "run_dir": str(job_dir)}
    summary = job_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        final = s["final"]
        row.update(status="completed", seconds=s.get("seconds"),
                   **{k: final.get(k) for k in ("accuracy", "compressed_bytes", "compression_ratio", "sparsity")},
                   metric=final.get("metric", "accuracy"), quality=final.get("quality", final.get("accuracy")))
        if final.get("compression_ratio") is None and final.get("nonzero_params"):
            row["nonzero_ratio"] = final["params"] / final["nonzero_params"]  # until the artifact records sizes
    else:
        row["status"] = "failed" if (job_dir / "FAILED").exists() else "incomplete"
    return row


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both maximised)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(a >= x and b >= y and (a > x or b > y) for a, b in points)]


def plot_pareto(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lwpipe.checkpoint import atomic_write

    xkey = "compression_ratio" if any(r.get("compression_ratio") is not None for r in rows) else "nonzero_ratio"
    done = [r for r in rows if r["status"] == "completed" and _number(r.get(xkey)) and _number(r.get("quality"))]
    metric = done[0]["metric"] if done else "accuracy"
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # the front maximises both coordinates
    points = [(float(r[xkey]), float(r["quality"])) for r in done]
    front = sorted(pareto_front([(x, sign * y) for x, y in points]), key=lambda i: points[i])
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        ax.scatter(*zip(*points), color="0.6", label="job")
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", color="C3", label="Pareto front")
        for r, (x, y) in zip(done, points):
            ax.annotate(r["job"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no completed job", ha="center", va="center", transform=ax.transAxes)
    failed = sum(r["status"] != "completed" for r in rows)
    ax.set_title(f"{len(done)} jobs" + (f", {failed} failed or incomplete" if failed else ""))
    ax.set_xlabel("compression ratio" if xkey == "compression_ratio"
                  else "params / nonzero params (compression_ratio not recorded)")
    ax.set_ylabel(f"final {metric}" + (" (lower is better)" if sign < 0 else ""))
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
            print(f"lwpipe: {len(bad)} of {len(rows)} jobs failed ({', '.join(bad)}); "
                  f"see {sweep_dir / 'summary.csv'}", file=sys.stderr)
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
        print(f"lwpipe-summary: {sweep_dir} is not a sweep directory (no multirun.yaml: Hydra writes one "
              "in each `lwpipe -m` sweep directory)", file=sys.stderr)
        sys.exit(2)
    if not job_dirs(sweep_dir):
        print(f"lwpipe-summary: {sweep_dir}: no Hydra job directories (.hydra/overrides.yaml) in it",
              file=sys.stderr)
        sys.exit(2)
    rows = write_summary(sweep_dir)
    for r in rows:
        q = f"{r['quality']:.4f}" if _number(r.get("quality")) else "-"
        print(f"{r['job']:>4}  {r['status']:<10}  {r.get('metric') or 'accuracy'} {q}  {r['overrides']}")
    print(f"wrote {sweep_dir / 'summary.csv'} and {sweep_dir / 'pareto.png'}")
