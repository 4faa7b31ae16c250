"""Stage cache: a stage's output model and records, keyed by everything that determines them.

    key(0)    = hash(model config, checkpoint file hash, data config + identity, seed,
                     device, eval settings, lwpipe version + source digest, torch version,
                     machine type, torch's thread count)
    key(step) = hash(key(step - 1), step, name, type, resolved stage settings)

The seed enters key(0) and every stage is seeded from (seed, step, name), so an
entry holds exactly what rerunning the stage would give. An entry is `<key>.safetensors`
(checkpoint.save_state), `<key>.lwp` (that model encoded as model.lwp, so a run whose last
stage is cached copies its artifact instead of encoding it again), `<key>.out.<name>` (each file the
stage wrote into its run directory, as declared by its class's `writes`: export.pt, export.json; a run
that replays the stage gets copies, and a copy that is lost makes the entry a miss) and `<key>.json` (the
stage's records and the files' sha256), all written atomically, the json last: an entry
without its json, or whose files do not match their hashes, is a miss. The json carries a
sha256 of its own key, file hashes and records, so that an edited record is recomputed
(with a warning), never replayed. The baseline record (the input model evaluated and
timed) is a records-only entry under baseline_key: a rerun replays it as it replays stages;
a report's report.png is an entry `<key>.png` + `<key>.json` keyed by what it draws (lwpipe/report.py).

A process killed mid-write leaves `.<file>.tmp<pid>` behind (checkpoint.atomic_write);
opening the cache removes those no running process can own.

Many jobs, one directory (a sweep's workers, SLURM jobs on a shared file system): a job that
misses an entry claims it with `<key>.lock`, created with O_CREAT|O_EXCL (atomic on NFS too) and
holding host, pid and time; a thread touches it while the stage runs. Another job that needs the
same entry waits for it (up to cache.wait_seconds, then a clear error) and loads it; a lock whose
pid is dead on this host, or that nobody touched for LOCK_STALE_SECONDS (its host died), is taken
over, so the waiting job computes the stage itself. `cache.max_bytes` bounds the directory: after
a store the least recently used entries are removed (`lwpipe-cache` lists and prunes by hand).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import stat
import time
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from lwpipe import cache_dir, checkpoint
from lwpipe.cache_files import (  # noqa: F401  (re-exported)
    check_writable,
    copy_checked,
    entry_sha256,
    file_sha256,
    remove_stale_temporaries,
)
from lwpipe.errors import LwpipeError

log = logging.getLogger("lwpipe")
PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def code_version() -> str:
    """lwpipe's version plus a digest of its source, so an edited stage never reuses stale entries."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE.rglob("*.py")):
        h.update(f.relative_to(PACKAGE).as_posix().encode())
        h.update(f.read_bytes())
    try:
        installed = version("lwpipe")
    except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not installed: the digest still keys it
        installed = "0+source"
    return f"{installed}+{h.hexdigest()[:12]}"


HASH_BELOW = 64 << 20  # bytes: smaller files are hashed; larger ones (model weights) keyed by size and mtime


def path_fingerprint(path: str) -> list | None:
    """What a model path holds: each file's name with its sha256 (its size and modification time when it
    is 64 MiB or more: hashing a 500 MB checkpoint on every run would cost seconds). None if missing."""
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.is_file() else []
    if not files:
        return None
    out = []
    for f in files:
        st = f.stat()
        out.append(
            [
                str(f.relative_to(root)) if root.is_dir() else f.name,
                file_sha256(f) if st.st_size < HASH_BELOW else [st.st_size, st.st_mtime_ns],
            ]
        )
    return out


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def initial_key(top, data_identity: str) -> str:
    """The key of the model the pipeline starts from."""
    ckpt = top.model.get("checkpoint")
    ckpt_hash = file_sha256(Path(ckpt).expanduser()) if ckpt else None
    path = top.model.get("path")  # a model directory or file: retrained in place, it must not hit old entries
    return digest(
        "input",
        top.model,
        ckpt_hash,
        path_fingerprint(path) if path else None,
        top.data,
        top.task.model_dump(),
        data_identity,
        top.seed,
        top.device,  # the task's loss trains every stage
        top.eval.model_dump(),
        code_version(),
        torch.__version__,
        platform.machine(),
        torch.get_num_threads(),
    )  # the thread count changes the last bits of CPU reductions


def baseline_key(initial: str, top) -> str:
    """The key of the baseline record: the input model's key (which covers the task) plus how it is timed."""
    return digest("baseline", initial, top.measure.model_dump())


def stage_key(prev: str, step: int, name: str, type_: str, settings: dict, source: str | None = None) -> str:
    """A setting naming a file (a teacher's weights) contributes the file's contents, not just its name;
    `source`: a plugin stage's source digest (stage_source), so an edited plugin never reuses stale entries."""
    files = {v: file_sha256(v) for v in _strings(settings) if Path(v).expanduser().is_file()}
    return digest(prev, step, name, type_, settings, files, *([source] if source else []))


def stage_source(cls: type) -> str | None:
    """The sha256 of the file defining a stage class from outside lwpipe (a plugin); None for lwpipe's own
    stages, which code_version() already covers."""
    cls = getattr(cls, "plugin_class", cls)
    try:
        path = Path(inspect.getsourcefile(cls) or "").resolve()
    except TypeError:  # defined in no file (built in an interpreter): nothing to key
        return None
    if not path.is_file() or PACKAGE in path.parents:
        return None
    return file_sha256(path)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class StageCache:
    """Entries in one directory; `enabled=False` makes every lookup a miss and every store a no-op.

    An enabled cache checks at once that its directory is writable (ConfigError otherwise) and removes
    temporaries left by killed processes."""

    def __init__(
        self, directory: str | Path, enabled: bool = True, max_bytes: int | None = None, wait_seconds: float = 86400.0
    ):
        self.dir = Path(directory)
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds
        self.locks = cache_dir.Locks(self.dir)
        self.computed = 0  # entries this cache stored: what the racing-jobs test and benchmark count
        self.loaded: dict[str, str] = {}  # key -> sha256 of the state file this process restored or stored
        self.warned: set[str] = set()  # keys of the unreadable entries already warned about
        if enabled:
            check_writable(self.dir)
            remove_stale_temporaries(self.dir)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.safetensors", self.dir / f"{key}.json"

    def copy_state(self, key: str, dest: Path) -> bool:
        """Copy the state file of an entry this cache loaded or stored to dest (atomically); False when it no
        longer matches the hash it had then (replaced or removed meanwhile): then save the model instead.
        A copy, not a second save_state: safetensors orders its metadata differently in every process."""
        expected = self.loaded.get(key)
        if expected is None:  # cache off, or an entry this process never saw
            return False
        return copy_checked(self._paths(key)[0], expected, dest)

    def restore_outputs(self, key: str, names, run_dir: Path) -> bool:
        """Copy the files among `names` that the stage wrote into its run directory, kept in its entry
        (`<key>.out.<name>`), into run_dir; False (with a warning) when one is missing or damaged."""
        if not names:  # most stages write nothing there: no second look at the entry
            return True
        files = (self._entry(key, None) or {}).get("files", {})
        for name in names:
            expected = files.get(f".out.{name}")
            if expected is not None and not copy_checked(self.dir / f"{key}.out.{name}", expected, run_dir / name):
                log.warning("cache entry %s: its copy of %s is missing or damaged; recomputing", key, name)
                return False
        return True

    def _entry(self, key: str, model: nn.Module | None) -> dict | None:
        """The checked entry json (and its state restored into `model` when given); None on a miss."""
        if not self.enabled:
            return None
        state, meta = self._paths(key)
        if not os.path.lexists(meta):
            return None
        try:
            entry = json.loads(cache_dir.read_regular(meta))  # a directory or a FIFO there: a miss, no hang
            if entry.get("entry_sha256") != entry_sha256(
                entry["key"], entry["state_sha256"], entry["records"], entry.get("files")
            ):
                raise ValueError("its records do not match their checksum: edited or damaged")
            if model is not None and not stat.S_ISREG(os.stat(state).st_mode):
                raise ValueError(f"{state.name} is not a regular file")
            if entry["key"] != key or (model is not None and file_sha256(state) != entry["state_sha256"]):
                raise ValueError("state file does not match its record")
            if model is not None:
                checkpoint.load_state(model, state)
                self.loaded[key] = entry["state_sha256"]
        except Exception as e:  # a damaged entry is recomputed, never trusted
            if key not in self.warned:  # once: a job waiting for the entry looks again every POLL_SECONDS
                self.warned.add(key)
                log.warning("cache entry %s is unreadable (%s); recomputing", key, e)
            return None
        try:
            os.utime(meta)  # last use: cache.max_bytes and `lwpipe-cache prune` remove the least recently used
        except OSError:
            pass
        return entry

    def load(self, key: str, model: nn.Module) -> list[dict] | None:
        """Restore the entry's state into `model` and return its records; None on a miss or a bad entry."""
        entry = self._entry(key, model)
        return None if entry is None else entry["records"]

    def load_records(self, key: str) -> list[dict] | None:
        """A records-only entry's records (store_records); None on a miss or a bad entry."""
        entry = self._entry(key, None)
        return None if entry is None else entry["records"]

    def file(self, key: str, suffix: str) -> bytes | None:
        """The entry's `<key><suffix>` file (".lwp": its model encoded; ".png": a report), if it has one that
        matches its hash; None otherwise."""
        expected = self._file_hash(key, suffix)
        if expected is None:
            return None
        try:
            blob = cache_dir.read_regular(self.dir / f"{key}{suffix}")
        except OSError:
            return None
        return blob if hashlib.sha256(blob).hexdigest() == expected else None

    def copy_file(self, key: str, suffix: str, dest: Path) -> bool:
        """Copy the entry's `<key><suffix>` file to dest (atomically, never held whole in memory) if it
        matches its hash; False otherwise."""
        expected = self._file_hash(key, suffix)
        return expected is not None and copy_checked(self.dir / f"{key}{suffix}", expected, dest)

    def _file_hash(self, key: str, suffix: str) -> str | None:
        """The sha256 the checked entry records for its `<key><suffix>` file; None on a miss or no such file."""
        return (self._entry(key, None) or {}).get("files", {}).get(suffix)

    def _write_files(self, key: str, files: dict[str, bytes | Path]) -> dict[str, str]:
        """Each `<key><suffix>`: bytes, or a file's contents (copied, never held in memory); their sha256."""
        hashes = {}
        for suffix, blob in files.items():
            dest = self.dir / f"{key}{suffix}"
            self._make_room(dest)
            if isinstance(blob, Path):

                def copy(tmp, src=blob, suffix=suffix) -> None:
                    shutil.copyfile(src, tmp)
                    hashes[suffix] = file_sha256(tmp)

                checkpoint.atomic_write(dest, copy)
            else:
                checkpoint.atomic_write(dest, lambda tmp, b=blob: Path(tmp).write_bytes(b))
                hashes[suffix] = hashlib.sha256(blob).hexdigest()
        return hashes

    def claim(self, key: str, model: nn.Module) -> list[dict] | None:
        """load(), and on a miss make sure only one job computes the entry: None means this process now
        holds its lock and computes it (store() releases it); a running job's lock is waited for, then
        its entry loaded (or, if that job died without one, the lock taken and None returned)."""
        records = self.load(key, model)
        if records is not None or not self.enabled:
            return records
        deadline, told = time.monotonic() + self.wait_seconds, False
        while not self.locks.try_acquire(key):
            holder = self.locks.holder(self.locks.path(key)) or {"age": 0.0}
            if not told:
                log.info(
                    "cache: another job is computing this stage (lock: %s); waiting for its entry, at most "
                    "%.0f s (cache.wait_seconds), or until its lock is %.0f s untouched (then taken over)",
                    cache_dir.describe(holder),
                    self.wait_seconds,
                    cache_dir.LOCK_STALE_SECONDS,
                )
                told = True
            if time.monotonic() > deadline:
                raise LwpipeError(
                    f"cache: waited {self.wait_seconds:.0f} s (cache.wait_seconds) for entry {key} "
                    f"(lock: {cache_dir.describe(holder)}); raise cache.wait_seconds, "
                    f"or delete {self.locks.path(key)} if that job is gone"
                )
            time.sleep(cache_dir.POLL_SECONDS)
            records = self.load(key, model) if self._paths(key)[1].exists() else None
            if records is not None:
                return records
        records = self.load(key, model)  # stored between our last look and the lock's release
        if records is not None:
            self.locks.release(key)
        return records

    def release(self) -> None:
        """Give up every lock still held (a failed or interrupted stage): waiting jobs compute it themselves."""
        self.locks.release()

    def store(
        self,
        key: str,
        model: nn.Module,
        records: list[dict],
        artifact: bytes | Path | None = None,
        outputs: dict[str, Path] | None = None,
    ) -> None:
        """The stage's model, records, its model encoded (`artifact`) and the files it wrote into the run
        directory (`outputs`, name -> path: restore_outputs copies them into a run that replays it)."""
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self._paths(key)[0]
        self._make_room(state)
        checkpoint.save_state(model, state)
        self.loaded[key] = file_sha256(state)
        files = {
            **({".lwp": artifact} if artifact is not None else {}),
            **{f".out.{name}": Path(path) for name, path in (outputs or {}).items()},
        }
        self._write_entry(key, self.loaded[key], records, files or None)
        self.computed += 1
        self.locks.release(key)
        self._bound(key)

    def store_records(self, key: str, records: list[dict], files: dict[str, bytes] | None = None) -> None:
        """An entry without a model state (the baseline's records; a report's png): nothing to lock."""
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_entry(key, None, records, files)
        self._bound(key)

    def _write_entry(
        self, key: str, state_sha256: str | None, records: list[dict], files: dict[str, bytes | Path] | None
    ) -> None:
        """The entry's other files, then its json (last: until it exists the entry is a miss)."""
        entry = {"key": key, "state_sha256": state_sha256, "records": records}
        if files:
            entry["files"] = self._write_files(key, files)
        entry["entry_sha256"] = entry_sha256(key, state_sha256, records, entry.get("files"))
        self._make_room(self._paths(key)[1])
        checkpoint.atomic_write(self._paths(key)[1], lambda tmp: Path(tmp).write_text(json.dumps(entry)))

    @staticmethod
    def _make_room(path: Path) -> None:
        """A directory where an entry's file belongs (a file can replace anything else): removed, with a
        warning, so that the entry can be written again."""
        if path.is_dir():
            log.warning("cache: %s is a directory, not an entry file; removing it to store the entry again", path)
            cache_dir.discard(path)

    def _bound(self, key: str) -> None:
        if self.max_bytes is not None:
            for e in cache_dir.prune(self.dir, max_bytes=self.max_bytes, keep={key}):
                log.info(
                    "cache: removed entry %s (%d bytes, least recently used) to stay within cache.max_bytes",
                    e["key"],
                    e["bytes"],
                )
