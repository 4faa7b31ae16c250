"""The files of a stage cache directory, shared by many jobs: entry locks, listing, pruning, `lwpipe-cache`.

    <key>.safetensors + <key>.lwp + <key>.json    an entry (lwpipe/cache.py writes them, the json last;
      [+ <key>.out.<name> ...]                    the baseline's is its json alone, a report's json + .png;
                                                  .out.<name>: a file the stage wrote, e.g. export.pt)
    <key>.lock                        a job computing that entry: {"host", "pid", "time"}

A lock is created with O_CREAT|O_EXCL, which is atomic on local file systems and on NFS (v3 on),
so of two jobs on any hosts exactly one gets it. Its holder touches it every LOCK_TOUCH_SECONDS;
a lock is stale when its pid is dead on this host, or nobody touched it for LOCK_STALE_SECONDS
(its host died or lost the mount). Taking a stale lock over renames it away first and checks that
what was renamed is the lock judged stale, so two jobs taking over at once cannot both win.

    lwpipe-cache [list] [--dir DIR]                          entries, newest first: size, age, stage
    lwpipe-cache prune [--dir DIR] [--older-than DAYS] [--max-bytes SIZE]

This module does not import torch: `lwpipe-cache` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("lwpipe")
LOCK_TOUCH_SECONDS = 15.0
LOCK_STALE_SECONDS = 120.0  # eight missed touches: the holder is gone
POLL_SECONDS = 0.2
HOST = socket.gethostname()
DEFAULT_DIR = "outputs/cache"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


LOCK_MAX_BYTES = 1 << 16  # a lock lwpipe writes is under 100 bytes


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes (at most `limit`). OSError for anything else: a directory, a FIFO (opened
    without blocking, so it cannot hang the reader), a device, a dangling symlink; FileNotFoundError if none."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        return f.read() if limit is None else f.read(limit)


def read_lock(path: Path) -> dict | None:
    """The lock's holder, with "age": seconds since its file was last touched; None when there is no lock.

    A lock that is not a JSON object (garbage, a directory, a symlink, one being written this instant)
    has only "age", by the mtime of the lock itself, and "unreadable" (why): young, it is not stale; once
    nobody has touched it for LOCK_STALE_SECONDS it is, and is taken over like any other."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return {"age": 0.0, "unreadable": e.strerror or str(e), "id": None}
    found = {"age": time.time() - st.st_mtime, "id": (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)}
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        return {**found, "unreadable": "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"}
    try:
        holder = json.loads(read_regular(path, LOCK_MAX_BYTES) or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {**found, "unreadable": "not JSON"}
    if not isinstance(holder, dict):
        return {**found, "unreadable": "not a JSON object"}
    return {**holder, **found}


def is_stale(holder: dict) -> bool:
    if holder["age"] > LOCK_STALE_SECONDS:
        return True
    return holder.get("host") == HOST and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])


def describe(holder: dict) -> str:
    if "unreadable" in holder:
        return f"an unreadable lock ({holder['unreadable']}), last touched {holder['age']:.0f} s ago"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, last seen {holder['age']:.0f} s ago"


def discard(path: Path) -> None:
    """Remove a file, symlink or directory tree at path (gone already: fine)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


class Locks:
    """The entry locks this process holds in one directory, kept fresh by one daemon thread."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.held: set[Path] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()  # the current touching thread's; set: it ends
        self._thread: threading.Thread | None = None
        self._seen: dict[Path, tuple] = {}  # lock -> (its read_lock id, when this process first saw it so)
        self._stuck: set[Path] = set()  # stale locks this process could not move away (warned once)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.lock"

    def holder(self, path: Path) -> dict | None:
        """read_lock(path), its age at least the time this process has seen the lock unchanged: a lock
        whose mtime lies in the future (a clock far ahead, a forged file) still goes stale."""
        found = read_lock(path)
        if found is None:
            self._seen.pop(path, None)
            return None
        now = time.monotonic()
        seen = self._seen.get(path)
        if seen is None or seen[0] != found["id"]:
            self._seen[path] = seen = (found["id"], now)
        found["age"] = max(found["age"], now - seen[1])
        return found

    def try_acquire(self, key: str) -> bool:
        """True when this process now holds key's lock; a stale lock is taken over."""
        path = self.path(key)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder(path)
                if holder is None or (is_stale(holder) and self._take_over(path, holder)):
                    continue  # gone, or removed as stale: try to create it again
                return False
            with os.fdopen(fd, "w") as f:
                json.dump({"host": HOST, "pid": os.getpid(), "time": time.time()}, f)
            with self._guard:
                self.held.add(path)
                self._seen.pop(path, None)
            self._start_touching()
            return True
        return False

    def _take_over(self, path: Path, holder: dict) -> bool:
        """Remove a stale lock, unless another job replaced or touched it in the meantime."""
        aside = path.with_name(f"{path.name}.stale{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True  # someone else removed it
        except OSError as e:  # not ours to move: the bound the waiting job prints still ends the wait
            if path not in self._stuck:  # once, not every poll
                self._stuck.add(path)
                log.warning("cache: cannot take over %s (%s)", path.name, e.strerror or e)
            return False
        moved = read_lock(aside) or {}
        if (moved.get("id"), moved.get("host"), moved.get("pid"), moved.get("time")) != (
            holder.get("id"),
            holder.get("host"),
            holder.get("pid"),
            holder.get("time"),
        ):
            try:
                os.link(aside, path)  # a fresh lock was renamed by mistake: put it back unless replaced
            except OSError:
                pass
        else:
            log.warning("cache: taking over %s (lock: %s): stale", path.name, describe(holder))
        discard(aside)
        return True

    def release(self, key: str | None = None) -> None:
        """Release key's lock, or every lock this process holds."""
        with self._guard:
            paths = [self.path(key)] if key is not None else list(self.held)
            for path in paths:
                if path in self.held:
                    self.held.discard(path)
                    path.unlink(missing_ok=True)
            if not self.held:  # a long-lived worker (joblib, Ray) runs many jobs: no thread left per job
                self._stop.set()

    def _start_touching(self) -> None:
        if self._thread is None or not self._thread.is_alive() or self._stop.is_set():
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._touch, args=(self._stop,), name="lwpipe-cache-locks", daemon=True
            )
            self._thread.start()

    def _touch(self, stop: threading.Event) -> None:
        while not stop.wait(LOCK_TOUCH_SECONDS):
            with self._guard:
                for path in self.held:
                    try:
                        os.utime(path)
                    except OSError:
                        pass


# entries: listing and pruning


def entries(directory: Path) -> list[dict]:
    """Complete entries, least recently used first: key, bytes, last use (json mtime), files, stage.
    An entry's files are every `<key>.<suffix>` (written before its json) but its json and lock."""
    directory, files = Path(directory), {}
    if not directory.is_dir():
        return []
    for name in os.listdir(directory):  # once: a glob per entry would make listing quadratic
        key, _, rest = name.partition(".")  # `.<name>.tmp<pid>` temporaries have no key
        if key and rest and rest != "json" and rest.split(".")[0] != "lock":
            files.setdefault(key, []).append(directory / name)
    out = []
    for meta in directory.glob("*.json"):
        try:
            st = meta.stat()
        except OSError:  # removed meanwhile
            continue
        own = files.get(meta.stem, [])
        size = st.st_size + sum(file_size(f) for f in own)
        out.append({"key": meta.stem, "bytes": size, "used": st.st_mtime, "meta": meta, "files": own})
    return sorted(out, key=lambda e: e["used"])


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # none (a records-only entry), or removed meanwhile
        return 0


def stage_of(entry: dict) -> str:
    try:
        saved = json.loads(read_regular(entry["meta"]))  # a FIFO in its place must not hang the listing
        records = saved["records"]
        if ".png" in (saved.get("files") or {}):
            return "report.png"
        ends = [r for r in records if r.get("event") == "stage_end"]
        if not ends and records and records[0].get("event") == "baseline":
            return "0 baseline"
        return f"{ends[-1]['step']} {ends[-1]['stage']}" if ends else "?"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return "?"


def remove(entry: dict) -> None:
    discard(entry["meta"])  # the json first: from now on the entry is a miss
    for f in entry["files"]:
        discard(f)


def prune(
    directory: Path, older_than: float | None = None, max_bytes: int | None = None, keep: set[str] = frozenset()
) -> list[dict]:
    """Remove entries last used more than older_than seconds ago, then the least recently used until the
    rest fit in max_bytes; entries in `keep` or locked by a running job stay. Returns what was removed."""
    now, removed = time.time(), []
    listed = entries(directory)
    total = sum(e["bytes"] for e in listed)
    for e in listed:
        if e["key"] in keep or (Path(directory) / f"{e['key']}.lock").exists():
            continue
        if (older_than is not None and now - e["used"] > older_than) or (max_bytes is not None and total > max_bytes):
            remove(e)
            removed.append(e)
            total -= e["bytes"]
    return removed


SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 500M, 2G or 1000000")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower()))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lwpipe-cache", description="List or prune a stage cache directory.")
    p.add_argument("action", nargs="?", choices=["list", "prune"], default="list")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"the cache directory (cache.dir; default {DEFAULT_DIR})")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="prune: entries unused for more days")
    p.add_argument("--max-bytes", type=parse_size, metavar="SIZE", help="prune: oldest first until under SIZE")
    a = p.parse_args(argv)
    directory = Path(a.dir)
    if not directory.is_dir():
        p.exit(2, f"lwpipe-cache: error: --dir {directory}: no such directory\n")
    if a.action == "prune":
        if a.older_than is None and a.max_bytes is None:
            p.exit(2, "lwpipe-cache: error: prune needs --older-than DAYS and/or --max-bytes SIZE\n")
        if a.older_than is not None and a.older_than < 0:
            p.exit(2, f"lwpipe-cache: error: --older-than {a.older_than}: must be >= 0 days\n")
        gone = prune(directory, None if a.older_than is None else a.older_than * 86400, a.max_bytes)
        left = entries(directory)
        print(
            f"removed {len(gone)} entries ({human(sum(e['bytes'] for e in gone))}); "
            f"{len(left)} left ({human(sum(e['bytes'] for e in left))})"
        )
        return
    listed, now = entries(directory)[::-1], time.time()
    print(f"{'key':<32}  {'size':>10}  {'unused':>7}  stage")
    for e in listed:
        print(f"{e['key']:<32}  {human(e['bytes']):>10}  {age(now - e['used']):>7}  {stage_of(e)}")
    locks = sorted(directory.glob("*.lock"))
    for lock in locks:
        holder = read_lock(lock)
        if holder:
            print(f"{lock.stem:<32}  {'computing':>10}  lock: {describe(holder)}")
    print(f"{len(listed)} entries, {human(sum(e['bytes'] for e in listed))} in {directory}", file=sys.stderr)


if __name__ == "__main__":
    main()
