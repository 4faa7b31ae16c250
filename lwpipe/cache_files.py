"""The stage cache's file handling: checksums, checked atomic copies, a writability probe, and the removal of
temporary files no running process can own (lwpipe/cache.py keeps the entries)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from lwpipe import cache_dir, checkpoint
from lwpipe.errors import ConfigError

log = logging.getLogger("lwpipe")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


TEMPORARY = re.compile(r"\..+\.tmp(\d+)")  # checkpoint.atomic_write's names
STALE_SECONDS = 3600  # a writer touches its file continuously and renames it within seconds of the last write
DEAD_OWNER_SECONDS = 60  # grace for a writer whose pid we cannot see (another host or pid namespace)


def remove_stale_temporaries(directory: Path, pattern: str = "*") -> int:
    """Remove the `.<name>.tmp<pid>` files under directory (glob `pattern`) that no running process can own:
    their pid is dead, or nothing has written them for an hour. Returns how many were removed."""
    removed, now = 0, time.time()
    for path in Path(directory).glob(pattern):
        m = TEMPORARY.fullmatch(path.name)
        if not m or not path.is_file():
            continue
        try:
            age = now - path.stat().st_mtime
            if age > STALE_SECONDS or (age > DEAD_OWNER_SECONDS and not cache_dir.pid_alive(int(m.group(1)))):
                path.unlink()
                removed += 1
        except OSError:  # gone already, or not ours to remove
            continue
    if removed:
        log.info("removed %d stale temporary file(s) in %s", removed, directory)
    return removed


def entry_sha256(key: str, state_sha256: str | None, records: list[dict], files: dict | None = None) -> str:
    parts = [key, state_sha256, records] + ([files] if files else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def copy_checked(src: Path, expected: str, dest: Path) -> bool:
    """Copy src to dest atomically if the copy's sha256 is `expected`; False otherwise (dest untouched)."""

    def copy(tmp) -> None:
        shutil.copyfile(src, tmp)  # refuses a FIFO or a directory: OSError
        if file_sha256(tmp) != expected:
            raise OSError("changed since it was stored")

    try:
        checkpoint.atomic_write(dest, copy)  # the copy is checked before it takes dest's name
        return True
    except OSError:
        return False


def check_writable(directory: Path, key: str = "cache.dir") -> None:
    """ConfigError unless files can be created in directory (made if missing): checked before any work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.tmp{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            key,
            str(directory),
            f"cannot write there ({e.strerror or e}); name a writable directory, or set cache.enabled=false",
        ) from None
