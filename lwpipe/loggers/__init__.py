"""Metric loggers: anything with log(record: dict) and close(). Built from `logger.<name>._target_`.

recipes/logger/ holds one file per logger (default = console + metrics.jsonl + the report);
`logger=mlflow`, `logger=tensorboard` or `logger=[mlflow,tensorboard]` add to the default set.
metrics.jsonl is the source of truth: a failure writing it fails the run. Any other logger that
fails warns once, is switched off, and the run goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.loggers.console import ConsoleLogger, format_header, format_row
from lwpipe.loggers.jsonl import JsonlLogger

__all__ = [
    "MetricLogger",
    "ConsoleLogger",
    "JsonlLogger",
    "build_loggers",
    "progress_hook",
    "format_header",
    "format_row",
]
log = logging.getLogger("lwpipe")
KNOWN = "console, jsonl, report, mlflow, tensorboard (recipes/logger/; any class with log(record) and close())"


class MetricLogger(Protocol):
    """Optionally also finish(summary): a finished run's last files, written before summary.json."""

    def log(self, record: dict) -> None: ...
    def close(self) -> None: ...


class WarnOnce:
    """Wraps a non-critical logger: its first error is one warning, then it is switched off."""

    def __init__(self, name: str, inner):
        self.name, self.inner, self.failed = name, inner, False

    def _call(self, what: str, *args) -> None:
        if self.failed:
            return
        try:
            getattr(self.inner, what)(*args)
        except Exception as e:  # a tracker must never stop the run: the run directory has everything
            self.failed = True
            log.warning(
                "logger.%s failed (%s: %s); it is off for the rest of this run, which goes on "
                "(the run directory keeps every record)",
                self.name,
                type(e).__name__,
                e,
            )

    def log(self, record: dict) -> None:
        self._call("log", record)

    def finish(self, summary: dict) -> None:
        if hasattr(self.inner, "finish"):
            self._call("finish", summary)

    def close(self) -> None:
        self._call("close")


def build_loggers(cfg: dict, run_dir: Path) -> list:
    """Each `logger.<name>` entry (null ones skipped) built with the run directory; on an error the
    loggers already built are closed, so nothing is left open or half-written."""
    from hydra.utils import instantiate

    built: list = []
    try:
        for name, c in cfg.items():
            if not c:
                continue
            if "_target_" not in c:
                raise ConfigError(f"logger.{name}._target_", None, f"required: the logger's class; known: {KNOWN}")
            try:
                lg = instantiate({**c, "run_dir": str(run_dir)}, _convert_="all")
            except Exception as e:
                cause = e.__cause__ or e
                if isinstance(cause, LwpipeError):
                    raise cause from None
                raise ConfigError(f"logger.{name}", c["_target_"], f"could not be built: {cause}") from None
            built.append(lg if getattr(lg, "critical", False) else WarnOnce(name, lg))
    except BaseException:
        for lg in built:
            lg.close()
        raise
    return built


def progress_hook(loggers: list):
    """The per-batch progress callback of the first logger that offers one (the console's bar)."""
    for lg in loggers:
        hook = getattr(getattr(lg, "inner", lg), "on_batch", None)
        if hook is not None:
            return hook
    return None
