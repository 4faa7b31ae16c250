"""Metric loggers: anything with log(record: dict) and close(). Built from `logger.<name>._target_`."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

log = logging.getLogger("lwpipe")

# (record key, header, width, format of a value)
COLUMNS = [
    ("step", "step", 4, "d"), ("stage", "stage", 12, "s"), ("event", "event", 9, "s"),
    ("accuracy", "accuracy", 8, ".4f"), ("loss", "loss", 7, ".4f"), ("sparsity", "sparsity", 8, ".4f"),
    ("max_unique_weights", "uniq_vals", 9, "d"), ("teacher_agreement", "agree", 6, ".4f"),
    ("compression_ratio", "ratio", 7, ".1f"), ("speedup", "speedup", 11, "x"), ("seconds", "seconds", 8, ".2f"),
]


class MetricLogger(Protocol):
    def log(self, record: dict) -> None: ...
    def close(self) -> None: ...


def format_row(record: dict) -> str:
    cells = []
    for key, _, width, fmt in COLUMNS:
        v = record.get(key)
        if fmt == "x":  # a mapping batch size -> speedup: "1.00/2.31"
            text = "/".join(f"{x:.2f}" for x in v.values()) if v else "-"
        else:
            text = "-" if v is None else format(v, fmt)
        cells.append(text.ljust(width) if fmt == "s" else text.rjust(width))
    return "  ".join(cells) + ("  (from cache)" if record.get("cached") else "")


def format_header() -> str:
    return "  ".join(h.ljust(w) if f == "s" else h.rjust(w) for _, h, w, f in COLUMNS)


class ConsoleLogger:
    """A readable table row per stage, epoch lines every `epoch_every` epochs (0: none), and the
    whole table again at the end, so that it is not scattered between epoch lines."""

    def __init__(self, run_dir: str | Path | None = None, epoch_every: int = 1):
        self.epoch_every = epoch_every
        self._header = False
        self._rows: list[dict] = []

    def log(self, record: dict) -> None:
        if record["event"] == "epoch":
            if self.epoch_every and record["epoch"] % self.epoch_every == 0:
                log.info("  %s epoch %d: train_loss %.4f  accuracy %.4f", record["stage"], record["epoch"],
                         record["train_loss"], record["accuracy"])
            return
        if not self._header:
            log.info(format_header())
            self._header = True
        self._rows.append(record)
        log.info(format_row(record))

    def close(self) -> None:
        if len(self._rows) > 1:
            log.info("summary:\n%s", "\n".join([format_header(), *map(format_row, self._rows)]))


class JsonlLogger:
    """One JSON object per line, flushed per record (a killed process loses nothing logged);
    baseline and stage_end records are also fsynced (nor does a machine crash)."""

    def __init__(self, run_dir: str | Path, path: str = "metrics.jsonl"):
        self.path = Path(run_dir) / path
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record, sort_keys=False) + "\n")
        self._f.flush()
        if record.get("event") != "epoch":
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
