"""The MLflow side of lwpipe.loggers.mlflow, run as a child process: JSON lines in on stdin,
an {"error": ...} line out on stdout for the first failure (after which it only drains its input).

Self-contained (standard library + mlflow) so that it starts without importing lwpipe or torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings


def numbers(record: dict) -> dict[str, float]:
    skip = {"step", "epoch"}
    return {
        k: float(v)
        for k, v in record.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class Worker:
    def __init__(self):
        self.client = self.run_id = None
        self.epochs: dict[str, int] = {}  # per stage: epoch records seen (a gradual prune restarts its epochs)
        self.cached: list[str] = []

    def start(self, msg: dict) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        with exclusive(msg.get("lock")):  # the client's first use of a new SQLite store creates its tables
            self.client = MlflowClient(tracking_uri=msg["uri"])
            exp_id = self.experiment(msg["experiment"], msg.get("artifact_location"))
        run = self.client.create_run(exp_id, run_name=msg["run_name"], tags=msg["tags"])
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in msg["params"].items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100], synchronous=True)

    def experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # a parallel job of the same sweep created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def log(self, msg: dict) -> None:
        from mlflow.entities import Metric

        r, t = msg["record"], msg["time_ms"]
        if r.get("event") == "epoch":
            n = self.epochs[r["stage"]] = self.epochs.get(r["stage"], 0) + 1
            metrics = [Metric(f"{r['stage']}/{k}", v, t, n) for k, v in numbers(r).items()]
        else:
            if r.get("cached") and r.get("event") == "stage_end" and r["stage"] not in self.cached:  # not "input"
                self.cached.append(r["stage"])
            values = {**numbers(r), "cached": 1.0 if r.get("cached") else 0.0}
            metrics = [Metric(k, v, t, int(r["step"])) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def close(self, msg: dict) -> None:
        for path in msg["artifacts"]:
            self.client.log_artifact(self.run_id, path)
        self.client.set_tag(self.run_id, "lwpipe.cached_stages", ",".join(self.cached))
        self.client.set_terminated(self.run_id, msg["status"])
        self.run_id = None


@contextlib.contextmanager
def exclusive(path: str | None):
    """An exclusive lock on the file `path` while the block runs (nothing when path is None or off POSIX)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    warnings.simplefilter("ignore")  # nobody reads this process's stderr: failures go out as one JSON line
    worker, failed = Worker(), False
    for line in sys.stdin:
        if failed:
            continue
        msg = json.loads(line)
        try:
            getattr(worker, msg["op"])(msg)
        except Exception as e:
            failed = True
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(json.dumps({"error": f"{type(e).__name__}: {first}"}), flush=True)
    if worker.run_id is not None and not failed:  # the run process went away without closing
        try:
            worker.client.set_terminated(worker.run_id, "KILLED")
        except Exception:
            pass


if __name__ == "__main__":
    main()
