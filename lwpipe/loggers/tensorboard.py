"""`logger=tensorboard`: scalars in <run dir>/tensorboard, named as in MLflow.

    baseline / stage_end records: each number at the record's `step`     (accuracy, compressed_bytes, ...)
    epoch records: `<stage>/<number>` at the epoch within that stage      (train/train_loss, prune/accuracy)

Written with torch.utils.tensorboard.SummaryWriter: PyTorch's own writer on top of the tensorboard
package (no TensorFlow), ~0.1 s to import, and it writes events from a background thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml


def numbers(record: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoardLogger:
    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard"):
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(run_dir / subdir))
        self.epochs: dict[str, int] = {}
        recipe = run_dir / "recipe.yaml"
        if recipe.is_file():  # the recipe in the TEXT tab, as a code block
            text = yaml.safe_dump(
                {k: v for k, v in yaml.safe_load(recipe.read_text()).items() if k != "defaults"}, sort_keys=False
            )
            self.writer.add_text("recipe", "    " + text.replace("\n", "\n    "), 0)

    def log(self, record: dict) -> None:
        if record.get("event") == "epoch":
            n = self.epochs[record["stage"]] = self.epochs.get(record["stage"], 0) + 1
            for k, v in numbers(record).items():
                self.writer.add_scalar(f"{record['stage']}/{k}", v, n)
        else:
            for k, v in {**numbers(record), "cached": float(bool(record.get("cached")))}.items():
                self.writer.add_scalar(k, v, int(record["step"]))

    def finish(self, summary: dict) -> None:
        self.writer.flush()  # before summary.json: a finished run has all its events on disk

    def close(self) -> None:
        self.writer.close()
