"""A sweep's worker processes: they stop when the process that launched them dies."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lwpipe import jobs
from tests.helpers import TINY


def alive_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (Linux /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text() if d.name.isdigit() else ""
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split() if stat else []
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def test_the_launching_process_and_single_runs_are_not_watched(monkeypatch):
    monkeypatch.delenv(jobs.SWEEP_PID, raising=False)
    jobs.watch_parent()
    monkeypatch.setenv(jobs.SWEEP_PID, str(os.getpid()))
    jobs.watch_parent()
    assert not any(t.name == jobs.WATCHDOG for t in threading.enumerate())


SWALLOWED = """
import signal, sys, time
from pathlib import Path
from lwpipe import jobs
signal.signal(signal.SIGTERM, lambda *a: None)  # the job's interrupt lost, as one raised in a finalizer is
jobs.running(Path(sys.argv[1]))
jobs._stop_with_parent(-1, 0.05, 0.3)  # -1 is no process's parent: the launching process is "gone"
time.sleep(30)
"""


@pytest.mark.parametrize("finished", [None, "summary.json", "FAILED"])
def test_a_worker_whose_job_ignores_the_stop_marks_the_job_itself(tmp_path, finished):
    """The watchdog's exit marks an unfinished job FAILED (interrupted); a finished or failed one it leaves."""
    if finished:
        (tmp_path / finished).write_text("{}")
    done = subprocess.run([sys.executable, "-c", SWALLOWED, str(tmp_path)], timeout=25, capture_output=True)
    assert done.returncode == 143, done.stderr.decode()[-2000:]
    marker = tmp_path / "FAILED"
    if finished is None:
        assert marker.read_text() == "interrupted\n"
    elif finished == "summary.json":
        assert not marker.exists()  # a run that finished is not called failed
    else:
        assert marker.read_text() == "{}"  # the job's own reason stays


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process groups from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_joblib_workers_stop_when_the_sweep_process_is_killed(tmp_path, sig):
    """kill -9 (or kill) of `lwpipe -m sweep=joblib` while both workers train: within seconds no worker
    is left, and each interrupted job says so in its directory."""
    exe = shutil.which("lwpipe")
    cmd = [exe] if exe else [sys.executable, "-m", "lwpipe.cli"]
    args = [
        "-m",
        "sweep=joblib",
        *TINY,
        "pipeline=[train]",
        "stages.train.epochs=100000",
        "measure.latency=false",
        "threads=1",
        "cache=false",
        "seed=0,1,2,3",
    ]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            cmd + args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )  # its own process group: the workers join it
    try:
        started = wait_for(lambda: len(list(tmp_path.glob("outputs/multiruns/*/*/[01]/metrics.jsonl"))) == 2, 120)
        assert started, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert len(alive_in_group(proc.pid)) >= 3  # the launching process and two workers at least
        os.kill(proc.pid, sig)
        proc.wait(timeout=20)
        assert wait_for(lambda: not alive_in_group(proc.pid), 20), alive_in_group(proc.pid)
        failed = sorted(tmp_path.glob("outputs/multiruns/*/*/*/FAILED"))
        assert [f.parent.name for f in failed] == ["0", "1"]
        assert all(f.read_text().strip() == "interrupted" for f in failed)
    finally:
        for pid in alive_in_group(proc.pid):
            os.kill(pid, signal.SIGKILL)
