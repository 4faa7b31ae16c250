"""`lwpipe`: compose a recipe with Hydra, validate it, run it.

Errors in the user's input print one message and exit with status 2; the
run directory of a run that failed before doing any work is removed, and
one that failed later holds FAILED and no summary.json. A run first claims
its directory (`claim`): one that another run, or anything else, already
holds is refused, and a refused run deletes or marks nothing there. A single run claims
it before Hydra writes .hydra/ and lwpipe.log into it (`ClaimRunDir`, a Hydra callback),
so a refused run leaves not even its config or a log line there. In a multirun a
failing job keeps its directory, holds FAILED, and returns NaN, so that the
sweep goes on and its summary (lwpipe/sweep.py) lists the job as failed.

`lwpipe-rerun DIR [overrides]` runs a past run again from the recipe.yaml in
its directory.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from lwpipe.errors import LwpipeError
from lwpipe.jobs import reuse_validated_configs

RECIPES = str(Path(__file__).resolve().parent.parent / "recipes")
log = logging.getLogger("lwpipe")
OWNER = ".lwpipe-owner"
HYDRA_FILES = {".hydra", "lwpipe.log"}  # what Hydra writes into the run directory before lwpipe runs
CLAIM_CALLBACK = "lwpipe.cli.ClaimRunDir"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # config.Top.name's pattern
INVALID_NAME = "invalid-name"


def dir_name(name) -> str:
    """The run name as a folder: a name validation will refuse (`../../X`) never leaves outputs/runs/."""
    return str(name) if NAME.fullmatch(str(name)) else INVALID_NAME


# cached: a sweep is named once, in the launching process, and its workers get that name with their configs
OmegaConf.register_new_resolver("lwpipe_pid", os.getpid, replace=True, use_cache=True)
OmegaConf.register_new_resolver("lwpipe_dir_name", dir_name, replace=True)


def claim(run_dir: Path) -> bool:
    """True when this run owns run_dir: it holds only what Hydra just wrote, and no other run claimed it first
    (the owner file is created exclusively)."""
    run_dir.mkdir(parents=True, exist_ok=True)  # Hydra made it, unless told not to write there
    if any(p.name not in HYDRA_FILES for p in run_dir.iterdir()):
        return False
    try:
        with open(run_dir / OWNER, "x") as f:
            f.write(f"{os.getpid()}\n")
        return True
    except FileExistsError:
        return False


def refused(run_dir: Path) -> str:
    return (
        f"the run directory {run_dir} already holds another run or other files; "
        f"lwpipe writes each run into a new directory (set hydra.run.dir to a new one)"
    )


class ClaimRunDir(Callback):
    """hydra.callbacks.claim: a single run claims hydra.run.dir before Hydra writes .hydra/ (the config and
    overrides) and lwpipe.log there; a directory another run holds is refused before it is touched."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # hydra.run.dir may name ${hydra:...}; run_job sets it again
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()  # `now` resolves once per config
        try:
            owned = claim(run_dir)
        except OSError as e:
            print(f"lwpipe: error: cannot create the run directory {run_dir}: {e.strerror or e}", file=sys.stderr)
            sys.exit(2)
        if not owned:
            print(f"lwpipe: error: {refused(run_dir)}", file=sys.stderr)
            sys.exit(2)


def claimed_before_hydra(hc) -> bool:
    """Whether ClaimRunDir claimed this run's directory (a single run with the callback configured): it
    either owns the directory or stopped the run."""
    return hc.mode == RunMode.RUN and any(
        (c or {}).get("_target_") == CLAIM_CALLBACK for c in (hc.callbacks or {}).values()
    )


def _fail(run_dir: Path, err, multirun: bool = False, owned: bool = True, name=None) -> None:
    if not owned:  # someone else's directory: touch nothing
        return
    if not multirun and not (run_dir / "metrics.jsonl").exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave nothing that looks like a run
        if run_dir.parent.name == dir_name(name):
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
    from lwpipe.cache import remove_stale_temporaries
    from lwpipe.config import validate  # imported here so --help stays fast
    from lwpipe.entropy_prune import settle_threshold
    from lwpipe.jobs import configure as configure_job
    from lwpipe.jobs import running
    from lwpipe.runner import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    wanted = cfg.get("objective")
    n_objectives = len(wanted) if isinstance(wanted, ListConfig) else 1
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` leaves a FAILED marker, as Ctrl-C does
    owned = claimed_before_hydra(hc) or claim(run_dir)
    fail = functools.partial(_fail, owned=owned, name=cfg.get("name"))
    try:
        if not owned:
            raise LwpipeError(refused(run_dir))
        settle_threshold(cfg, hc.overrides.task)  # a command-line threshold replaces the recipe's sparsity
        recipe = validate(cfg)
        configure_job(recipe.top.threads, hc, multirun)  # torch threads and console tag (lwpipe/jobs.py)
        for pattern in ("*/.*.tmp*", "*/checkpoints/.*.tmp*"):  # left by killed runs of the same name
            remove_stale_temporaries(run_dir.parent, pattern)
        running(run_dir)  # a sweep worker killed mid-job marks this directory (lwpipe.jobs)
        final = run(recipe, run_dir)
    except KeyboardInterrupt:
        fail(run_dir, "interrupted", multirun)
        if multirun:
            raise
        print("lwpipe: interrupted; finished stages are cached: run the same command again to go on", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if multirun:  # Hydra's sweepers stop the whole sweep on a raised job error: report, go on
            fail(run_dir, e, multirun)
            if isinstance(e, LwpipeError):
                log.error("job %s failed: %s", hc.job.num, e)
            else:
                log.exception("job %s failed", hc.job.num)
            return float("nan") if n_objectives == 1 else (float("nan"),) * n_objectives
        if isinstance(e, LwpipeError):
            fail(run_dir, e)
            print(f"lwpipe: error: {e}", file=sys.stderr)
            sys.exit(2)
        # not an input error we recognise: one line here, the run directory keeps the traceback
        (run_dir / "FAILED").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"lwpipe: error: {type(e).__name__}: {first}\n(traceback in {run_dir / 'FAILED'})", file=sys.stderr)
        sys.exit(1)
    finally:
        running(None)
    log.info("run directory: %s", os.path.relpath(run_dir) if run_dir.is_relative_to(Path.cwd()) else run_dir)
    return objective(final, recipe.top.objective)


def check_presets(args: list[str]) -> None:
    """`sweep=NAME` must name a preset: Hydra would skip a misspelt optional one and run the basic launcher."""
    presets = sorted(p.stem for p in (Path(RECIPES) / "sweep").glob("*.yaml"))
    for arg in args:
        key, eq, value = arg.lstrip("+").partition("=")
        if eq and key == "sweep" and value not in presets and value not in ("null", ""):
            print(
                f"lwpipe: error: sweep={value!r}: no such preset; the presets are {', '.join(presets)} "
                f"(recipes/sweep/)",
                file=sys.stderr,
            )
            sys.exit(2)


def main() -> None:
    check_presets(sys.argv[1:])
    reuse_validated_configs()  # a sweep composes each job's config once (lwpipe/jobs.py)
    if "" not in sys.path and "." not in sys.path:  # as `python -m`: model._target_=mypkg.build finds ./mypkg.py
        sys.path.insert(0, "")
    _main()


def rerun() -> None:
    """lwpipe-rerun DIR [overrides]: the run in DIR again, from its resolved recipe.yaml."""
    if len(sys.argv) < 2 or sys.argv[1].startswith("-") or not (Path(sys.argv[1]) / "recipe.yaml").is_file():
        print(
            "usage: lwpipe-rerun RUN_DIR [overrides...]  (RUN_DIR holds the recipe.yaml of a past run)", file=sys.stderr
        )
        sys.exit(2)
    run_dir = Path(sys.argv[1]).resolve()
    overrides = sys.argv[2:]
    # recipe.yaml is resolved: logger.console.quiet holds the old run's value, not `${quiet}`, so a
    # `quiet=` override is passed on to the console logger as well (when the run had one)
    quiet = [o.split("=", 1)[1] for o in overrides if o.startswith("quiet=")]
    if quiet and "console:" in (run_dir / "recipe.yaml").read_text():
        from omegaconf import OmegaConf

        if OmegaConf.select(OmegaConf.load(run_dir / "recipe.yaml"), "logger.console") is not None:
            overrides.append(f"logger.console.quiet={quiet[-1]}")
    sys.argv = [sys.argv[0], "--config-dir", str(run_dir), "--config-name", "recipe", *overrides]
    reuse_validated_configs()
    _main()


if __name__ == "__main__":
    main()
