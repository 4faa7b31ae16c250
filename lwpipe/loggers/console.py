"""The console: a table row per stage, one line per epoch, a progress bar on a terminal.

Every line fits 80 columns (the console handler prints messages without Hydra's time stamp
prefix; lwpipe.log keeps it). `quiet=true` leaves only warnings and errors on the console.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("lwpipe")


def headline(record: dict) -> tuple[str, float | None]:
    """The task's quality metric: (name, value); `metric`/`quality` when the record has them, else accuracy."""
    if record.get("quality") is not None:
        return str(record.get("metric") or "quality"), record["quality"]
    return "accuracy", record.get("accuracy")


def format_quality(name: str, value) -> str:
    if value is None:
        return "-"
    if name == "accuracy":
        return f"{100 * value:.2f}%"
    # fixed decimals, so a column of perplexities lines up (.4g wrote 17.12 above 17.1)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3g}"


def _num(fmt: str):
    return lambda v: "-" if v is None else format(v, fmt)


# (header, width, value of a record as text); quality's header is the record's metric name
COLUMNS = [
    ("step", 4, lambda r: str(r["step"])),
    ("stage", 10, lambda r: r["stage"] if len(r["stage"]) <= 10 else r["stage"][:9] + "~"),
    (None, 9, lambda r: format_quality(*headline(r))),
    ("loss", 7, lambda r: _num(".4f")(r.get("loss"))),
    ("sparsity", 8, lambda r: _num(".4f")(r.get("sparsity"))),
    ("distinct", 8, lambda r: _num("d")(r.get("max_unique_weights"))),
    ("agree", 6, lambda r: _num(".4f")(r.get("teacher_agreement"))),
    ("ratio", 5, lambda r: "-" if r.get("compression_ratio") is None else f"{r['compression_ratio']:.1f}x"),
    ("secs", 6, lambda r: "cached" if r.get("cached") else _num(".2f")(r.get("seconds"))),
]


def format_header(metric: str = "accuracy") -> str:
    # a metric name wider than its column is cut with a mark ("perplexit" read as a typo)
    cells = [(h or (metric if len(metric) <= w else metric[: w - 1] + "~")) for h, w, _ in COLUMNS]
    return "  ".join(c.ljust(w) if h == "stage" else c.rjust(w) for c, (h, w, _) in zip(cells, COLUMNS))


def format_row(record: dict) -> str:
    return "  ".join(f(record).ljust(w) if h == "stage" else f(record).rjust(w) for h, w, f in COLUMNS)


def format_epoch(record: dict) -> str:
    name, value = headline(record)
    return (
        f"  {record['stage'][:20]} epoch {record['epoch']}: train_loss {record['train_loss']:.4f}  "
        f"{name[:12]} {format_quality(name, value)}"
    )


FORMS = {"plain": "plain model", "baked": "baked plain model"}  # lwpipe/speed.py's latency_form


def format_speed(record: dict) -> str:
    """A record's speed against the input model (lwpipe/speed.py), naming the form that was timed;
    one line, two when that does not fit 80 columns; '' without timing."""
    if not record.get("speedup"):
        return ""
    cells = [f"batch {b} {x:.2f}x ({record['latency_ms'][b]:.2g} ms)" for b, x in list(record["speedup"].items())[:2]]
    form = record.get("latency_form")
    head = f"speedup vs input ({FORMS.get(form, form)}):" if form else "speedup vs input:"
    line = f"{head} {', '.join(cells)}"
    return line if len(line) <= 80 else f"{head}\n  {', '.join(cells)}"


def speed_rows(rows: list[dict]) -> list[dict]:
    """The records the summary's speed lines come from: the last one, and after an export the model it
    was made from too (its baked form), so both deployable forms are compared with the input."""
    if len(rows) > 1 and rows[-1].get("type") == "export":
        return rows[-2:]
    return rows[-1:]


def format_reference(metric: str) -> str:
    """What the table's comparisons are against (lwpipe/runner.py: ctx.reference_outputs)."""
    what = "cosine, agree" if metric == "cosine" else "agree"
    return f"{what}: vs the uncompressed model (before the first compression stage)"


def console_handlers() -> list[logging.Handler]:
    """The root logger's handlers that write to the terminal (not lwpipe.log)."""
    return [
        h
        for h in logging.getLogger().handlers
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
    ]


class ConsoleLogger:
    """A row per stage, a line every `epoch_every` epochs (0: none), the table again at the end, and a
    progress bar per stage and epoch on a terminal (`progress: false` turns the bar off), redrawn at most
    every `refresh` seconds (0: at every batch, whatever the machine's speed)."""

    def __init__(
        self,
        run_dir: str | Path | None = None,
        epoch_every: int = 1,
        progress: bool = True,
        quiet: bool = False,
        refresh: float = 0.1,
    ):
        self.epoch_every = epoch_every
        self._header = False
        self._rows: list[dict] = []
        self._quieted = [(h, h.level) for h in console_handlers()] if quiet else []
        for h, _ in self._quieted:
            h.setLevel(logging.WARNING)
        self.on_batch = None
        if progress and not quiet and sys.stderr.isatty():
            from lwpipe.progress import Progress

            self.on_batch = Progress(sys.stderr, mininterval=refresh)

    def log(self, record: dict) -> None:
        if record["event"] == "epoch":
            if self.epoch_every and record["epoch"] % self.epoch_every == 0:
                log.info(format_epoch(record))
            return
        if not self._header:
            log.info(format_header(headline(record)[0]))
            self._header = True
        self._rows.append(record)
        log.info(format_row(record))

    def close(self) -> None:
        if self.on_batch is not None:
            self.on_batch.close()
        if len(self._rows) > 1:
            metric = headline(self._rows[0])[0]
            log.info(
                "summary:\n%s",
                "\n".join([format_header(metric), *map(format_row, self._rows), format_reference(metric)]),
            )
            for speed in filter(None, map(format_speed, speed_rows(self._rows))):
                log.info(speed)
        for h, level in self._quieted:
            h.setLevel(level)
