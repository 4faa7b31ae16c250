"""Progress: a bar per stage and epoch on a terminal, fed by training.fit's per-batch hook; 80 columns."""

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from lwpipe.progress import Progress
from tests.helpers import TINY, run_recipe

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Spy:
    """A logger offering a progress hook, recording what fit reports."""

    calls: list = []

    def __init__(self, run_dir):
        self.on_batch = lambda *a: Spy.calls.append(a)

    def log(self, record):
        pass

    def close(self):
        pass


def segments(text: str) -> list[str]:
    """What a terminal shows: every piece between carriage returns and newlines, escapes removed."""
    return [s for s in re.split(r"[\r\n]", ANSI.sub("", text)) if s.strip()]


def test_fit_reports_every_batch_with_its_loss(tmp_path):
    Spy.calls = []
    _, records = run_recipe(
        TINY
        + [
            "pipeline=[train]",
            "stages.train.epochs=2",
            "logger.report=null",
            "+logger.spy._target_=tests.test_progress.Spy",
        ],
        tmp_path,
    )
    batches = -(-384 // 64)  # blobs: 512 samples, a quarter held out, batches of 64
    assert [c[:5] for c in Spy.calls] == [("train", e, 2, b, batches) for e in (1, 2) for b in range(1, batches + 1)]
    epochs = [r for r in records if r["event"] == "epoch"]
    for e, r in zip((1, 2), epochs):  # the bar's running loss ends at the epoch's train_loss (equal batches)
        losses = [c[5] for c in Spy.calls if c[1] == e]
        assert sum(losses) / len(losses) == pytest.approx(r["train_loss"], rel=1e-5)


def test_bar_shows_batches_eta_and_running_loss_within_80_columns():
    out = io.StringIO()
    p = Progress(out, width=80, mininterval=0)
    for epoch in (1, 2):
        for b in range(1, 31):
            p("a_rather_long_stage_name", epoch, 2, b, 30, 1.0 / b)
    p.close()
    shown = segments(out.getvalue())
    assert shown and max(len(s) for s in shown) <= 80
    assert any("15/30" in s and "loss" in s and "<" in s for s in shown)  # batches done, ETA, running loss


@pytest.mark.slow
def test_a_run_on_an_80_column_terminal_fits(tmp_path):
    """Through a pseudo-terminal, as a user sees it: bars, epoch lines and tables all fit 80 columns."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "COLUMNS": "80", "LINES": "24"}
    args = TINY + [
        "pipeline=[train,prune]",
        "stages.train.epochs=2",
        "stages.prune.finetune.epochs=1",
        "data.n=8000",
        f"hydra.run.dir={tmp_path / 'run'}",
        "cache=false",
        "logger.console.refresh=0",
    ]  # a bar at every batch: an epoch ends before 0.1 s on a fast machine
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lwpipe.cli import main; main()", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    shown = [s for s in segments(text) if not s.startswith("run directory: ")]  # a path is as long as it is
    assert max(len(s) for s in shown) <= 80, max(shown, key=len)
    assert any(re.search(r"train 1/2 .*\d+/\d+ \[.*, loss \d", s) for s in shown), shown  # the bar
    assert any("train epoch 2:" in s for s in shown)


def test_quiet_leaves_only_warnings_on_the_console_and_restores_it(monkeypatch):
    import logging

    from lwpipe.loggers import ConsoleLogger

    console = logging.StreamHandler(sys.stdout)
    root = logging.getLogger()
    root.addHandler(console)
    try:
        c = ConsoleLogger(None, quiet=True)
        assert console.level == logging.WARNING and c.on_batch is None  # no bar either
        c.close()
        assert console.level == logging.NOTSET
    finally:
        root.removeHandler(console)


def test_the_bar_redraws_at_every_batch_when_asked(monkeypatch):
    """logger.console.refresh=0: every batch is drawn, so what a terminal shows does not depend on speed."""
    from lwpipe.loggers import ConsoleLogger

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(out, "isatty", lambda: True, raising=False)
    c = ConsoleLogger(None, refresh=0)
    for b in range(1, 6):  # five batches in well under the default 0.1 s
        c.on_batch("train", 1, 1, b, 5, 1.0)
    c.close()
    shown = segments(out.getvalue())
    assert [n for n in range(1, 5) if any(f"{n}/5 [" in s and "loss" in s for s in shown)] == [1, 2, 3, 4]
