"""`lwpipe`: compose a recipe with Hydra, validate it, run it.

Errors in the user's input print one message and exit with status 2; the
run directory of a run that failed before doing any work is removed, and
one that failed later holds FAILED and no summary.json.
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lwpipe.errors import LwpipeError

RECIPES = str(Path(__file__).resolve().parent.parent / "recipes")
log = logging.getLogger("lwpipe")


def _fail(run_dir: Path, err: Exception) -> None:
    if not (run_dir / "metrics.jsonl").exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave nothing that looks like a run
    else:
        (run_dir / "FAILED").write_text(f"{err}\n")


@hydra.main(config_path=RECIPES, config_name="config", version_base="1.3")
def _main(cfg: DictConfig):
    from lwpipe.config import validate  # imported here so --help stays fast
    from lwpipe.runner import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        recipe = validate(cfg)
        final = run(recipe, run_dir)
    except LwpipeError as e:
        _fail(run_dir, e)
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed and goes on
        print(f"lwpipe: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BaseException as e:
        _fail(run_dir, e if not isinstance(e, KeyboardInterrupt) else "interrupted")
        raise
    log.info("run directory: %s", run_dir)
    return final["accuracy"]


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
