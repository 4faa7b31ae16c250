"""What a run directory holds so that the run can be understood and repeated.

recipe.yaml     the fully resolved recipe (every swept value materialised); it is also a
                primary config: `lwpipe-rerun DIR` runs it again
run_info.json   seed, git commit, versions of python / torch / lwpipe, the command line
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch
import yaml

from lwpipe import checkpoint
from lwpipe.cache import code_version

REPO = Path(__file__).resolve().parent.parent
HEADER = (
    "# The fully resolved recipe of this run. Rerun it: lwpipe-rerun {dir}\n"
    "# (same as: lwpipe --config-dir {dir} --config-name recipe)\n"
)


def git_commit(repo: Path = REPO) -> dict | None:
    """The commit lwpipe's source is at, and whether it has uncommitted changes; None outside git."""

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def run_info(recipe) -> dict:
    return {
        "seed": recipe.top.seed,
        "git": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lwpipe": code_version(),
        "hydra": version("hydra-core"),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),  # CPU sums' last bits depend on it (it is in the cache key too)
        "argv": sys.argv,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_run_files(run_dir: Path, recipe) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"defaults": [{"hydra": "default"}, "_self_"], **recipe.raw}
    text = HEADER.format(dir=run_dir) + yaml.safe_dump(resolved, sort_keys=False)
    checkpoint.atomic_write(run_dir / "recipe.yaml", lambda tmp: Path(tmp).write_text(text))
    info = json.dumps(run_info(recipe), indent=2)
    checkpoint.atomic_write(run_dir / "run_info.json", lambda tmp: Path(tmp).write_text(info))


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (getrusage: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def record_peak_rss(run_dir: Path) -> None:
    """Add the process's peak RSS so far to run_info.json (`peak_rss_bytes`), at the end of a run."""
    add_run_info(run_dir, peak_rss_bytes=peak_rss_bytes())


def add_run_info(run_dir: Path, **fields) -> None:
    """Add `fields` to run_info.json (written again, atomically)."""
    path = Path(run_dir) / "run_info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
