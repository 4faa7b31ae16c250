"""`logger=mlflow`: every record to an MLflow run, from a helper process.

    params     the resolved recipe (recipe.yaml), flattened: stages.prune.sparsity = 0.9
    metrics    baseline / stage_end records: each number at the record's `step` (one curve over the pipeline);
               epoch records: `<stage>/<number>` at the epoch (a curve per stage); `cached` 1/0 per stage
    tags       lwpipe.run_dir, lwpipe.recipe, lwpipe.overrides; in a multirun lwpipe.sweep and lwpipe.job
    artifacts  model.lwp, summary.json, recipe.yaml, metrics.jsonl, report.png, report.md (at the end)

MLflow's import alone takes ~2 s, and a remote server may be slow or go away, so the work runs in a
child process (mlflow_worker.py) fed through a pipe: the run never waits for MLflow, except at the
end for up to `close_timeout` seconds. The tracking URI is checked before the run starts (an
unreachable server or an unwritable path is an error, exit 2); a failure later warns once and the
run goes on: the run directory is the source of truth.

The default store is a SQLite database, sqlite:///outputs/mlflow.db (MLflow 3's own default kind:
its client and `mlflow ui` read it without MLFLOW_ALLOW_FILE_STORE), with the artifacts beside it in
outputs/mlartifacts; a path asks for a file store, which still works.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from lwpipe.errors import ConfigError

log = logging.getLogger("lwpipe")
WORKER = Path(__file__).with_name("mlflow_worker.py")
ARTIFACTS = ("model.lwp", "summary.json", "recipe.yaml", "metrics.jsonl", "report.png", "report.md")
# a lost server should cost seconds, not MLflow's default minutes of retries; the user's settings win
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def flatten(value, prefix: str = "") -> dict[str, str]:
    """{'stages': {'prune': {'sparsity': 0.9}}} -> {'stages.prune.sparsity': '0.9'}; lists as JSON."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    text = json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)
    return {prefix: text[:6000]}  # MLflow's limit on a param's value


DEFAULT_URI = "sqlite:///outputs/mlflow.db"


def sqlite_db(uri: str) -> Path | None:
    """The database file of a sqlite:// URI, made absolute as SQLAlchemy reads it (sqlite:///rel.db is relative
    to the working directory, sqlite:////abs.db absolute); None for an in-memory database."""
    rest = uri.split("?", 1)[0].removeprefix("sqlite://")
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(rest[1:]).expanduser().resolve()


def check_tracking_uri(value: str) -> str:
    """The URI MLflow is given; ConfigError when it cannot work (checked before the run starts)."""
    key = "logger.mlflow.tracking_uri"
    scheme = urllib.parse.urlparse(value).scheme if "://" in value or value.startswith("file:") else ""
    if scheme in ("", "file"):
        path = Path(urllib.parse.urlparse(value).path if scheme else value).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(key, value, f"cannot create the store directory: {e.strerror or e}") from None
        if not os.access(path, os.W_OK):
            raise ConfigError(key, value, "the store directory is not writable")
        return path.as_uri()
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(value.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # it answered: reachable (authentication and the like are MLflow's to report)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(
                key,
                value,
                f"cannot reach the tracking server ({reason}); start it, or log to a "
                "local store such as sqlite:///outputs/mlflow.db",
            ) from None
        return value
    if scheme == "sqlite":
        db = sqlite_db(value)
        if db is None:
            return value
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(key, value, f"cannot create the database's directory: {e.strerror or e}") from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise ConfigError(key, value, "the database or its directory is not writable")
        query = value.partition("?")[1] + value.partition("?")[2]
        return f"sqlite:///{db}{query}"  # absolute: the helper process does not depend on the working directory
    return value  # databricks, other plugins: MLflow itself decides


def job_identity(run_dir: Path) -> dict:
    """Overrides, and in a multirun the sweep directory and job number (from Hydra, else the run directory)."""
    tags = {}
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            tags["lwpipe.overrides"] = " ".join(hc.overrides.task)
            if hc.mode == RunMode.MULTIRUN:
                tags["lwpipe.sweep"] = str(Path(hc.sweep.dir).resolve())
                tags["lwpipe.job"] = str(hc.job.num)
    except Exception:  # Hydra not running this job (tests, the API): fall back to the run directory
        pass
    saved = run_dir / ".hydra" / "overrides.yaml"
    if "lwpipe.overrides" not in tags and saved.is_file():
        tags["lwpipe.overrides"] = " ".join(yaml.safe_load(saved.read_text()) or [])
    return tags


def run_identity(run_dir: Path, experiment: str | None) -> tuple[dict, dict, str, str]:
    """(the resolved recipe, the run's tags, the experiment, the run's name) from its run directory: a sweep's
    jobs share one experiment named after the sweep, each named by its job number and overrides."""
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").is_file() else {}
    recipe.pop("defaults", None)
    name = str(recipe.get("name", "lwpipe"))
    tags = {"lwpipe.run_dir": str(run_dir.resolve()), "lwpipe.recipe": name, **job_identity(run_dir)}
    if experiment is None:
        experiment = f"{name} sweep {Path(tags['lwpipe.sweep']).name}" if "lwpipe.sweep" in tags else name
    run_name = (
        f"job {tags['lwpipe.job']}: {tags.get('lwpipe.overrides', '')}".strip(": ")
        if "lwpipe.job" in tags
        else run_dir.name
    )
    return recipe, tags, experiment, run_name


class MlflowLogger:
    def __init__(
        self,
        run_dir: str | Path,
        tracking_uri: str = DEFAULT_URI,
        experiment: str | None = None,
        close_timeout: float = 60.0,
    ):
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError(
                "logger.mlflow",
                "mlflow",
                'needs the mlflow package (mlflow-skinny is enough): pip install -e ".[tracking]"',
            )
        self.run_dir = Path(run_dir)
        self.close_timeout = close_timeout
        uri = check_tracking_uri(str(tracking_uri))
        recipe, tags, experiment, run_name = run_identity(self.run_dir, experiment)
        env = {**HTTP_DEFAULTS, **os.environ}
        if uri.startswith("file:"):  # MLflow 3 keeps the file store behind this switch ("maintenance mode")
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        # run by path with nothing of ours on sys.path: lwpipe/loggers/mlflow.py must not shadow mlflow
        code = f"import sys, runpy; sys.path[:1] = []; runpy.run_path({str(WORKER)!r}, run_name='__main__')"
        self._proc = subprocess.Popen(
            [sys.executable, "-u", "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )  # Ctrl-C stops the run, not the last upload
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._warned = False
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()
        db = sqlite_db(uri) if uri.startswith("sqlite:") else None
        self._queue.put(
            {
                "op": "start",
                "uri": uri,
                "experiment": experiment,
                "run_name": run_name,
                "tags": tags,
                "params": flatten(recipe),
                # parallel jobs must not build one new database at once; artifacts beside it
                "lock": f"{db}.lock" if db else None,
                "artifact_location": (db.parent / "mlartifacts").as_uri() if db else None,
            }
        )

    def _write(self) -> None:  # a thread: the run never blocks on a full pipe
        try:
            while (msg := self._queue.get()) is not None:
                self._proc.stdin.write(json.dumps(msg) + "\n")
                self._proc.stdin.flush()
            self._proc.stdin.close()
        except OSError as e:
            self._warn(f"the MLflow helper process stopped ({e})")

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "error" in msg:
                self._warn(msg["error"])

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "logger.mlflow: %s; MLflow logging is off for the rest of this run, which goes on "
                "(the run directory keeps everything)",
                why,
            )

    def log(self, record: dict) -> None:
        self._queue.put({"op": "log", "time_ms": int(time.time() * 1000), "record": record})

    def close(self) -> None:
        finished = (self.run_dir / "summary.json").is_file()
        files = [str(self.run_dir / f) for f in ARTIFACTS if (self.run_dir / f).is_file()]
        self._queue.put({"op": "close", "status": "FINISHED" if finished else "FAILED", "artifacts": files})
        self._queue.put(None)
        try:
            self._proc.wait(timeout=self.close_timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self._warn(f"MLflow did not take the last records within close_timeout={self.close_timeout} s")
        self._writer.join(timeout=10)  # the helper has exited: only a slow machine makes these wait
        self._reader.join(timeout=10)  # (its last line may be the warning the run must show)
        self._proc.stdout.close()
