"""metrics.jsonl: the run's own record of every measurement (the source of truth)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlLogger:
    """One JSON object per line, flushed per record (a killed process loses nothing logged);
    baseline and stage_end records are also fsynced (nor does a machine crash). The file is
    opened at the first record, so a run refused before its baseline leaves none."""

    critical = True  # its errors fail the run: it is what the report, the cache and resume read

    def __init__(self, run_dir: str | Path, path: str = "metrics.jsonl"):
        self.path = Path(run_dir) / path
        self._f = None

    def log(self, record: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, sort_keys=False) + "\n")
        self._f.flush()
        if record.get("event") != "epoch":
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
