"""Rewrite the docs' result tables from real runs of their own recipes, so that they cannot drift.

    python benchmarks/readme_tables.py                    # run every recipe, rewrite the pages holding tables
    python benchmarks/readme_tables.py --check            # run them, exit 1 if a page differs
    python benchmarks/readme_tables.py --only default --page /tmp/benchmarks.md

Each table sits between `<!-- readme_tables:NAME -->` and `<!-- /readme_tables:NAME -->` in one of the pages
(docs/*.md and README.md; today all are in docs/benchmarks.md); NAME is a key of TABLES.
A table is `summary.json` of `lwpipe recipe=RECIPE cache=false` (seed 0, CPU, one thread) run in a temporary
directory; the `inspect:` tables are `lwpipe-inspect` of that run's model.lwp.
Everything outside the markers is left as it is (prose quoting a figure must be checked by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# marker name -> (recipe, whether the table starts with the untrained input model)
TABLES = {
    "default": ("default", True),
    "deep_compression_lenet300": ("deep_compression_lenet300", False),
    "deep_compression_lenet300_paper": ("deep_compression_lenet300_paper", False),
    "deep_compression_lenet5": ("deep_compression_lenet5", False),
    "deep_compression_lenet5_paper": ("deep_compression_lenet5_paper", False),
}
INSPECT = {"inspect:deep_compression_lenet300": "deep_compression_lenet300"}
HEADER = (
    "| stage | accuracy | sparsity | max distinct | teacher agreement | model.lwp bytes | ratio |\n"
    "|---|---|---|---|---|---|---|"
)


def marked(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- readme_tables:{re.escape(name)} -->\n)(.*?)(<!-- /readme_tables:{re.escape(name)} -->)", re.S
    )


def table(summary: dict, with_input: bool) -> str:
    records = ([summary["baseline"]] if with_input else []) + summary["stages"]
    rows = [
        f"| {r['stage']} | {100 * r['accuracy']:.2f}% | {r['sparsity']:.4f} | {r['max_unique_weights']} | "
        f"{r['teacher_agreement']:.4f} | {r['compressed_bytes']} | {r['compression_ratio']:.1f}× |"
        for r in records
    ]
    return "\n".join([HEADER, *rows])


def replace(text: str, name: str, body: str) -> str:
    pattern = marked(name)
    if not pattern.search(text):
        raise SystemExit(f"readme_tables: no page has markers for {name!r}")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(3), text, count=1)


def pages(only: str | None) -> list[Path]:
    """The files whose markers are rewritten: --page alone, else every docs page and the README."""
    return [Path(only)] if only else [*sorted((ROOT / "docs").glob("**/*.md")), ROOT / "README.md"]


def rewrite(paths: list[Path], bodies: dict[str, str]) -> dict[Path, tuple[str, str]]:
    """Each changed or unchanged page's (original, rewritten) text; every table must land in one page."""
    texts = {path: path.read_text() for path in paths if path.exists()}
    out = {path: (text, text) for path, text in texts.items()}
    for name, body in bodies.items():
        holder = next((path for path, (_, text) in out.items() if marked(name).search(text)), None)
        if holder is None:
            raise SystemExit(f"readme_tables: no page has markers for {name!r} (looked in {len(out)} pages)")
        out[holder] = (out[holder][0], replace(out[holder][1], name, body))
    return out


def run_recipe(recipe: str, work: Path, extra: list[str]) -> Path:
    run_dir = work / recipe
    exe = shutil.which("lwpipe")
    cmd = ([exe] if exe else [sys.executable, "-m", "lwpipe.cli"]) + [
        f"recipe={recipe}",
        "cache=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"readme_tables: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return run_dir


def inspect_table(run_dir: Path) -> str:
    exe = shutil.which("lwpipe-inspect")
    cmd = ([exe] if exe else [sys.executable, "-m", "lwpipe.artifact.inspect"]) + [str(run_dir / "model.lwp")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return "```\n" + out.split("\n\n", 1)[1].rstrip("\n") + "\n```"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--page", "--readme", dest="page", help="rewrite this file only (default: docs/*.md, README.md)")
    p.add_argument("--only", nargs="*", help="marker names (default: all)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 when a table differs")
    p.add_argument("overrides", nargs="*", help="extra lwpipe overrides (for trying the script quickly)")
    a = p.parse_args()
    wanted = set(a.only or list(TABLES) + list(INSPECT))
    bodies: dict[str, str] = {}
    runs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in list(TABLES) + list(INSPECT) if n in wanted]:
            recipe = TABLES[name][0] if name in TABLES else INSPECT[name]
            if recipe not in runs:
                print(f"running recipe={recipe} ...", flush=True)
                runs[recipe] = run_recipe(recipe, Path(tmp), a.overrides)
            if name in TABLES:
                summary = json.loads((runs[recipe] / "summary.json").read_text())
                bodies[name] = table(summary, TABLES[name][1])
            else:
                bodies[name] = inspect_table(runs[recipe])
    # read only now: the runs take minutes, and the pages may have been edited meanwhile
    texts = rewrite(pages(a.page), bodies)
    differ = [path for path, (before, after) in texts.items() if before != after]
    if a.check:
        print("tables differ from fresh runs in " + ", ".join(map(str, differ)) if differ else "tables are up to date")
        sys.exit(1 if differ else 0)
    for path in differ:
        path.write_text(texts[path][1])
    print(f"rewrote {', '.join(map(str, differ)) or 'nothing (unchanged)'}: {', '.join(sorted(wanted))}")


if __name__ == "__main__":
    main()
