"""`lwpipe`: compose a recipe with Hydra, validate it, run it.

Errors in the user's input print one message and exit with status 2; the
run directory of a run that failed before doing any work is removed, and
one that failed later holds FAILED and no summary.json. In a multirun a
failing job keeps its directory, holds FAILED, and returns NaN, so that the
sweep goes on and its summary (lwpipe/sweep.py) lists the job as failed.

`lwpipe-rerun DIR [overrides]` runs a past run again from the recipe.yaml in
its directory.
"""
from __future__ import annotations

import logging
import shutil
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig

from lwpipe.errors import LwpipeError

RECIPES = str(Path(__file__).resolve().parent.parent / "recipes")
log = logging.getLogger("lwpipe")


def _fail(run_dir: Path, err, multirun: bool = False) -> None:
    if not multirun and not (run_dir / "metrics.jsonl").exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave nothing that looks like a run
        try:
            run_dir.parent.rmdir()  # and no empty outputs/runs/<name>/ either
        except OSError:
            pass
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "FAILED").write_text(f"{err}\n")


def objective(final: dict, names: list[str]):
    """The values a sweeper optimises: one float, or a tuple for several objectives."""
    missing = [n for n in names if final.get(n) is None]
    if missing:
        log.warning("objective %s not in the final record; returning NaN for it", missing)
    values = tuple(float(final.get(n) if final.get(n) is not None else "nan") for n in names)
    return values[0] if len(values) == 1 else values


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@hydra.main(config_path=RECIPES, config_name="config", version_base="1.3")
def _main(cfg: DictConfig):
    from lwpipe.config import validate  # imported here so --help stays fast
    from lwpipe.runner import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    wanted = cfg.get("objective")
    n_objectives = len(wanted) if isinstance(wanted, ListConfig) else 1
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` leaves a FAILED marker, as Ctrl-C does
    try:
        recipe = validate(cfg)
        final = run(recipe, run_dir)
    except KeyboardInterrupt:
        _fail(run_dir, "interrupted", multirun)
        if multirun:
            raise
        print("lwpipe: interrupted; finished stages are cached: run the same command again to go on",
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if multirun:  # Hydra's sweepers stop the whole sweep on a raised job error: report, go on
            _fail(run_dir, e, multirun)
            if isinstance(e, LwpipeError):
                log.error("job %s failed: %s", hc.job.num, e)
            else:
                log.exception("job %s failed", hc.job.num)
            return float("nan") if n_objectives == 1 else (float("nan"),) * n_objectives
        if isinstance(e, LwpipeError):
            _fail(run_dir, e)
            print(f"lwpipe: error: {e}", file=sys.stderr)
            sys.exit(2)
        # not an input error we recognise: one line here, the run directory keeps the traceback
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "FAILED").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"lwpipe: error: {type(e).__name__}: {first}\n(traceback in {run_dir / 'FAILED'})", file=sys.stderr)
        sys.exit(1)
    log.info("run directory: %s", run_dir)
    return objective(final, recipe.top.objective)


def main() -> None:
    if "" not in sys.path and "." not in sys.path:  # as `python -m`: model._target_=mypkg.build finds ./mypkg.py
        sys.path.insert(0, "")
    _main()


def rerun() -> None:
    """lwpipe-rerun DIR [overrides]: the run in DIR again, from its resolved recipe.yaml."""
    if len(sys.argv) < 2 or sys.argv[1].startswith("-") or not (Path(sys.argv[1]) / "recipe.yaml").is_file():
        print("usage: lwpipe-rerun RUN_DIR [overrides...]  (RUN_DIR holds the recipe.yaml of a past run)",
              file=sys.stderr)
        sys.exit(2)
    run_dir = Path(sys.argv[1]).resolve()
    sys.argv = [sys.argv[0], "--config-dir", str(run_dir), "--config-name", "recipe", *sys.argv[2:]]
    _main()


if __name__ == "__main__":
    main()
