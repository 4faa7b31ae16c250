"""One cache, many jobs: entry locks, racing processes, cache.max_bytes and `lwpipe-cache`."""

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from torch import nn

from lwpipe import cache_dir
from lwpipe.cache import StageCache
from lwpipe.errors import LwpipeError
from tests.helpers import TINY, run_recipe

CHAIN = TINY + [
    "pipeline=[train,prune]",
    "stages.train.epochs=30",
    "stages.prune.sparsity=0.5",
    "stages.prune.finetune.epochs=1",
    "measure.latency=false",
]
RACER = """
import json, sys, time
from pathlib import Path
from tests.helpers import run_recipe
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
final, records = run_recipe(sys.argv[3:], Path(sys.argv[2]))
print(json.dumps([r["cached"] for r in records if r["event"] == "stage_end"]))
"""


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(path, host, pid, age=0.0):
    path.write_text(json.dumps({"host": host, "pid": pid, "time": time.time() - age}))
    os.utime(path, (time.time() - age, time.time() - age))


@pytest.mark.slow
def test_two_processes_racing_for_a_stage_compute_it_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    go = tmp_path / "go"
    args = CHAIN + [f"cache.dir={tmp_path / 'cache'}"]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(go), str(tmp_path / f"run{i}"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in (0, 1)
    ]
    time.sleep(3)  # both have imported torch and wait for the start signal
    go.touch()
    outs = [p.communicate(timeout=600) for p in racers]
    assert [p.returncode for p in racers] == [0, 0], [err[-2000:] for _, err in outs]
    cached = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    computed = [sum(not c for c in step) for step in zip(*cached)]
    assert computed == [1, 1], cached  # each stage computed by one job, loaded by the other
    finals = [json.loads((tmp_path / f"run{i}" / "summary.json").read_text())["final"] for i in (0, 1)]
    assert finals[0]["accuracy"] == finals[1]["accuracy"]
    assert finals[0]["compressed_bytes"] == finals[1]["compressed_bytes"]
    assert not list((tmp_path / "cache").glob("*.lock"))


def test_a_dead_jobs_lock_is_taken_over(tmp_path):
    c = StageCache(tmp_path)
    write_lock(tmp_path / "k.lock", cache_dir.HOST, dead_pid())
    assert c.claim("k", nn.Linear(2, 2)) is None  # ours to compute
    assert json.loads((tmp_path / "k.lock").read_text())["pid"] == os.getpid()
    c.release()
    assert not (tmp_path / "k.lock").exists()


def test_a_lock_nobody_touches_is_taken_over(tmp_path):
    c = StageCache(tmp_path)
    write_lock(tmp_path / "k.lock", "another-host", 1, age=cache_dir.LOCK_STALE_SECONDS + 5)
    assert c.claim("k", nn.Linear(2, 2)) is None
    assert json.loads((tmp_path / "k.lock").read_text())["host"] == cache_dir.HOST


def test_waiting_for_a_live_lock_times_out_with_a_clear_message(tmp_path):
    c = StageCache(tmp_path, wait_seconds=0.5)
    write_lock(tmp_path / "k.lock", "another-host", 4242)
    t = time.monotonic()
    with pytest.raises(LwpipeError, match=r"waited 0 s \(cache.wait_seconds\).*pid 4242 on another-host.*k.lock"):
        c.claim("k", nn.Linear(2, 2))
    assert 0.4 < time.monotonic() - t < 60  # waited its 0.5 s, and then stopped (60: a hang, not a slow machine)
    assert (tmp_path / "k.lock").exists()  # not ours: left alone


def test_a_waiting_job_loads_the_entry_the_lock_holder_stores(tmp_path):
    holder, waiter = StageCache(tmp_path), StageCache(tmp_path, wait_seconds=30)
    model = nn.Linear(2, 2)
    assert holder.claim("k", model) is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])  # stores in 1 s
    records = [{"step": 1, "stage": "s", "event": "stage_end"}]
    import threading

    threading.Timer(1.0, holder.store, ("k", model, records)).start()
    target = nn.Linear(2, 2)
    assert waiter.claim("k", target) == records
    child.wait()
    assert all((target.weight == model.weight).flatten().tolist())
    assert holder.computed == 1 and waiter.computed == 0


def test_max_bytes_keeps_the_directory_bounded(tmp_path):
    c = StageCache(tmp_path)
    for i in range(4):
        c.store(f"k{i}", nn.Linear(64, 64), [])
        time.sleep(0.02)
    entry = sum(e["bytes"] for e in cache_dir.entries(tmp_path)) // 4
    c.max_bytes = 2 * entry + 10
    c.load("k0", nn.Linear(64, 64))  # recently used: stays
    c.store("k4", nn.Linear(64, 64), [])
    left = {e["key"] for e in cache_dir.entries(tmp_path)}
    assert left == {"k0", "k4"}
    assert sum(e["bytes"] for e in cache_dir.entries(tmp_path)) <= c.max_bytes


def test_lwpipe_cache_lists_and_prunes(tmp_path):
    c = StageCache(tmp_path)
    for i in range(3):
        c.store(f"k{i}", nn.Linear(32, 32), [{"step": i, "stage": f"s{i}", "event": "stage_end"}])
    old = time.time() - 3 * 86400
    os.utime(tmp_path / "k0.json", (old, old))

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "lwpipe.cache_dir", *args, "--dir", str(tmp_path)], capture_output=True, text=True
        )

    listed = cli("list")
    assert listed.returncode == 0 and "3 entries" in listed.stderr
    assert "0 s0" in listed.stdout and "3.0d" in listed.stdout
    pruned = cli("prune", "--older-than", "2")
    assert pruned.returncode == 0 and "removed 1 entries" in pruned.stdout
    assert {e["key"] for e in cache_dir.entries(tmp_path)} == {"k1", "k2"}
    assert cli("prune", "--max-bytes", "1").stdout.startswith("removed 2 entries")
    bad = cli("prune", "--max-bytes", "lots")
    assert bad.returncode == 2 and "'lots' is not a size" in bad.stderr
    assert cli("prune").returncode == 2


def test_a_failed_stage_releases_its_lock(tmp_path):
    with pytest.raises(Exception):  # noqa: B017  (whatever the failing stage raises)
        run_recipe(
            CHAIN
            + [
                f"cache.dir={tmp_path / 'cache'}",
                "stages.train.lr=1e30",
                "stages.train.epochs=1",
                "+stages.train.no_such_key=1",
            ],
            tmp_path / "run",
        )
    assert not list((tmp_path / "cache").glob("*.lock"))


def test_a_held_lock_is_touched_until_released(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_dir, "LOCK_TOUCH_SECONDS", 0.05)
    locks = cache_dir.Locks(tmp_path)
    for key in ("a", "b"):  # a second lock after the first's release gets a touching thread again
        assert locks.try_acquire(key)
        old = time.time() - 1000
        os.utime(tmp_path / f"{key}.lock", (old, old))
        time.sleep(0.5)
        assert cache_dir.read_lock(tmp_path / f"{key}.lock")["age"] < 10
        locks.release(key)
        assert not (tmp_path / f"{key}.lock").exists()


def test_entries_without_a_state_and_with_files_are_listed_sized_checked_and_pruned_whole(tmp_path):
    c = StageCache(tmp_path)
    c.store("stage", nn.Linear(8, 8), [{"step": 1, "stage": "s", "event": "stage_end"}], b"lwp-bytes")
    c.store_records("base", [{"step": 0, "stage": "input", "event": "baseline"}])
    c.store_records("pic", [], {".png": b"png-bytes"})
    sizes = {e["key"]: e["bytes"] for e in cache_dir.entries(tmp_path)}
    assert sizes["stage"] == sum((tmp_path / f"stage{x}").stat().st_size for x in (".json", ".safetensors", ".lwp"))
    assert sizes["pic"] == sum((tmp_path / f"pic{x}").stat().st_size for x in (".json", ".png"))
    assert {cache_dir.stage_of(e) for e in cache_dir.entries(tmp_path)} == {"1 s", "0 baseline", "report.png"}
    assert c.file("stage", ".lwp") == b"lwp-bytes" and c.load_records("base")[0]["event"] == "baseline"
    (tmp_path / "pic.png").write_bytes(b"png-bytez")  # damaged: not returned
    assert c.file("pic", ".png") is None and c.file("base", ".png") is None
    cache_dir.prune(tmp_path, older_than=-1)
    assert list(tmp_path.iterdir()) == []  # every file of every entry went


def make_unreadable_lock(path, kind):
    if kind == "garbage":
        path.write_bytes(b"\x00{not json")
    elif kind == "a JSON list":
        path.write_text("[1, 2]")
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "symlink to garbage":
        (path.parent / "target").write_text("garbage")
        path.symlink_to(path.parent / "target")
    elif kind == "dangling symlink":
        path.symlink_to(path.parent / "nowhere")
    old = time.time() - cache_dir.LOCK_STALE_SECONDS - 5
    os.utime(path, (old, old), follow_symlinks=False)


@pytest.mark.parametrize("kind", ["garbage", "a JSON list", "directory", "symlink to garbage", "dangling symlink"])
def test_an_unreadable_lock_nobody_touched_is_taken_over_with_a_warning(tmp_path, kind, caplog):
    (tmp_path / "cache").mkdir()
    c = StageCache(tmp_path / "cache", wait_seconds=3)
    make_unreadable_lock(tmp_path / "cache" / "k.lock", kind)
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        assert c.claim("k", nn.Linear(2, 2)) is None  # ours to compute, not a wait of cache.wait_seconds
    assert json.loads((tmp_path / "cache" / "k.lock").read_text())["pid"] == os.getpid()
    assert "taking over k.lock (lock: an unreadable lock" in caplog.text
    assert not list((tmp_path / "cache").glob("k.lock.*"))  # the lock set aside is gone
    assert kind != "symlink to garbage" or (tmp_path / "cache" / "target").read_text() == "garbage"  # not followed
    c.release()


def test_a_young_unreadable_lock_is_waited_for_as_one_being_written(tmp_path):
    c = StageCache(tmp_path, wait_seconds=0.5)
    (tmp_path / "k.lock").write_text('{"host": "h')  # a lock half written this instant
    with pytest.raises(LwpipeError, match=r"\(lock: an unreadable lock \(not JSON\), last touched [01] s ago\)"):
        c.claim("k", nn.Linear(2, 2))


def test_a_fifo_lock_is_read_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "k.lock")
    found = []
    reader = threading.Thread(target=lambda: found.append(cache_dir.read_lock(tmp_path / "k.lock")), daemon=True)
    reader.start()
    reader.join(5)
    assert found and found[0]["unreadable"] == "not a regular file"


def test_a_lock_dated_in_the_future_still_goes_stale_and_the_wait_names_its_bounds(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache_dir, "LOCK_STALE_SECONDS", 0.5)
    write_lock(tmp_path / "k.lock", "another-host", 4242, age=-86400)  # touched "tomorrow": age < 0 for a day
    c = StageCache(tmp_path, wait_seconds=10)
    with caplog.at_level(logging.INFO, logger="lwpipe"):
        assert c.claim("k", nn.Linear(2, 2)) is None  # unchanged for 0.5 s while watched: stale
    assert "at most 10 s (cache.wait_seconds), or until its lock is 0 s untouched" in caplog.text
    assert json.loads((tmp_path / "k.lock").read_text())["host"] == cache_dir.HOST
    c.release()


def test_lwpipe_cache_lists_and_prunes_hostile_entries_and_locks(tmp_path):
    StageCache(tmp_path).store("good", nn.Linear(4, 4), [{"step": 1, "stage": "s", "event": "stage_end"}])
    (tmp_path / "dir.json").mkdir()
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    make_unreadable_lock(tmp_path / "junk.lock", "garbage")
    listed = subprocess.run(
        [sys.executable, "-m", "lwpipe.cache_dir", "list", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # a FIFO read would hang here
    assert listed.returncode == 0 and "4 entries" in listed.stderr, listed.stderr
    assert "1 s" in listed.stdout and "lock: an unreadable lock (not JSON)" in listed.stdout
    assert len(cache_dir.prune(tmp_path, older_than=-1)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.lock"]
