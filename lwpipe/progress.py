"""Progress on a terminal: a tqdm bar per stage and epoch with batches done, ETA and the running loss.

    train 3/20  45%|██████████▍            | 12/27 [00:01<00:01, loss 0.5583]

Shown only when stderr is a terminal (lwpipe.loggers.ConsoleLogger decides; `quiet=true` or
`logger.console.progress=false` turn it off); elsewhere (CI, files) the console logger's one line
per epoch is the progress. While a bar is open, log lines go through tqdm.write, so they never
tear it. tqdm rather than rich: it is already imported with torch's stack (no import cost), writes
plain text that fits a fixed width, and ships the logging redirect this needs.
"""

from __future__ import annotations

import logging
import shutil
import sys

WIDTH = 80  # the bar never grows past an 80-column terminal


class ConsoleFormatter(logging.Formatter):
    """The console shows the message alone (lwpipe.log keeps the time stamps); warnings and errors
    say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class Progress:
    """Callable as on_batch(stage, epoch, epochs, batch, batches, loss); one bar per epoch, removed
    when the epoch ends (its one-line summary is logged in its place)."""

    def __init__(self, stream=None, width: int | None = None, mininterval: float = 0.1):
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.stream = stream or sys.stderr
        size = shutil.get_terminal_size((WIDTH, 24))  # falls back when the terminal reports 0 x 0
        self.width, self.rows = width or min(WIDTH, size.columns), max(size.lines, 2)
        self.mininterval = mininterval
        self.bar = None
        self._total, self._n = 0.0, 0
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    def __call__(self, stage: str, epoch: int, epochs: int, batch: int, batches: int, loss: float) -> None:
        from tqdm import tqdm

        if batch == 1 or self.bar is None:
            self._close_bar()
            self._total, self._n = 0.0, 0
            self.bar = tqdm(
                total=batches or None,
                desc=f"{stage[:16]} {epoch}/{epochs}",
                leave=False,
                file=self.stream,
                ncols=self.width,
                nrows=self.rows,
                dynamic_ncols=False,
                unit="batch",
                mininterval=self.mininterval,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
            )
        self._total, self._n = self._total + loss, self._n + 1
        self.bar.set_postfix_str(f"loss {self._total / self._n:.4f}", refresh=False)
        self.bar.update(1)
        if batches and batch >= batches:
            self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()
        self._redirect.__exit__(None, None, None)
