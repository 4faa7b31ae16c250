"""logger=mlflow, logger=tensorboard, several at once, and loggers that fail: read back with each tool's reader."""

import http.server
import json
import logging
import threading
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from lwpipe.cli import RECIPES
from lwpipe.config import validate
from lwpipe.errors import LwpipeError
from lwpipe.loggers.console import format_header, format_row
from lwpipe.runner import run
from tests.helpers import TINY, compose_recipe, run_recipe

FAST = TINY + [
    "pipeline=[train,prune]",
    "stages.prune.sparsity=0.5",
    "stages.train.epochs=3",
    "stages.prune.finetune.epochs=2",
    "logger.report=null",
]


class Broken:
    """A logger whose tracking server is gone: every call fails."""

    def __init__(self, run_dir):
        self.calls = 0

    def log(self, record):
        raise ConnectionError("tracking server gone")

    def close(self):
        raise ConnectionError("tracking server gone")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run logged to MLflow and TensorBoard at once (logger=[mlflow,tensorboard])."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the reading side here; the logger sets it for itself
    tmp = tmp_path_factory.mktemp("tracked")
    store = tmp / "mlruns"
    _, records = run_recipe(FAST + ["logger=[mlflow,tensorboard]", f"logger.mlflow.tracking_uri={store}"], tmp / "run")
    yield tmp / "run", store, records
    mp.undo()


def client(store):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


@pytest.mark.slow
def test_mlflow_run_has_params_metrics_per_step_and_artifacts(tracked):
    run_dir, store, records = tracked
    c = client(store)
    (exp,) = [e for e in c.search_experiments() if e.name == "default"]
    (r,) = c.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params["stages.prune.sparsity"] == "0.5" and r.data.params["pipeline"] == '["train", "prune"]'
    assert r.data.tags["lwpipe.run_dir"] == str(run_dir.resolve())
    ends = [x for x in records if x["event"] != "epoch"]
    history = c.get_metric_history(r.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(x["step"], x["accuracy"]) for x in ends]
    assert [m.value for m in c.get_metric_history(r.info.run_id, "compressed_bytes")] == [
        x["compressed_bytes"] for x in ends
    ]
    train_loss = [x["train_loss"] for x in records if x["event"] == "epoch" and x["stage"] == "prune"]
    assert [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, "prune/train_loss")] == list(
        enumerate(train_loss, 1)
    )
    names = {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"model.lwp", "summary.json", "recipe.yaml", "metrics.jsonl"} <= names


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # MLflow's SQL under SQLAlchemy 2.1
def test_the_default_store_is_a_database_mlflows_client_reads_without_a_switch(tmp_path, monkeypatch):
    """logger=mlflow alone: sqlite:///outputs/mlflow.db, artifacts in outputs/mlartifacts, no file store."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    _, records = run_recipe(FAST + ["logger=mlflow", "cache=false"], tmp_path / "run")
    c = MlflowClient(tracking_uri="sqlite:///outputs/mlflow.db")
    (r,) = c.search_runs([c.get_experiment_by_name("default").experiment_id])
    assert r.info.status == "FINISHED" and r.data.params["stages.prune.sparsity"] == "0.5"
    assert r.data.metrics["accuracy"] == records[-1]["accuracy"]
    assert {"model.lwp", "summary.json"} <= {a.path for a in c.list_artifacts(r.info.run_id)}
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir() if p.name != "cache") == [
        "mlartifacts",
        "mlflow.db",
        "mlflow.db.lock",
    ]


def test_sqlite_uris_are_read_as_sqlalchemy_reads_them(tmp_path, monkeypatch):
    from lwpipe.loggers.mlflow import check_tracking_uri, sqlite_db

    monkeypatch.chdir(tmp_path)
    assert sqlite_db("sqlite:///outputs/mlflow.db") == tmp_path / "outputs" / "mlflow.db"  # relative
    assert sqlite_db(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"  # four slashes: absolute
    assert sqlite_db("sqlite://") is None and sqlite_db("sqlite:///:memory:") is None
    assert check_tracking_uri("sqlite:///new/dir/m.db") == f"sqlite:///{tmp_path}/new/dir/m.db"
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(
        LwpipeError,
        match=r"logger\.mlflow\.tracking_uri='sqlite:///file/m.db': cannot create the "
        r"database's directory",
    ):
        check_tracking_uri("sqlite:///file/m.db")


def test_tensorboard_scalars_per_step(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, records = tracked
    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    ends = [x for x in records if x["event"] != "epoch"]
    got = [(e.step, e.value) for e in ea.Scalars("accuracy")]
    assert [s for s, _ in got] == [x["step"] for x in ends]
    assert [v for _, v in got] == pytest.approx([x["accuracy"] for x in ends], rel=1e-6)
    train = [x for x in records if x["event"] == "epoch" and x["stage"] == "train"]
    assert [e.value for e in ea.Scalars("train/train_loss")] == pytest.approx(
        [x["train_loss"] for x in train], rel=1e-6
    )
    assert "prune/accuracy" in ea.Tags()["scalars"]


@pytest.mark.slow
def test_cached_stages_are_logged_as_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store, cache = tmp_path / "mlruns", f"cache.dir={tmp_path / 'cache'}"
    args = FAST + ["logger=mlflow", f"logger.mlflow.tracking_uri={store}", "logger.mlflow.experiment=cached", cache]
    run_recipe(args, tmp_path / "a")
    run_recipe(args, tmp_path / "b")
    c = client(store)
    runs = c.search_runs([c.get_experiment_by_name("cached").experiment_id], order_by=["attributes.start_time"])
    assert [r.data.tags["lwpipe.cached_stages"] for r in runs] == ["", "train,prune"]
    assert [m.value for m in c.get_metric_history(runs[0].info.run_id, "cached")] == [0.0, 0.0, 0.0]
    assert [m.value for m in c.get_metric_history(runs[1].info.run_id, "cached")] == [1.0, 1.0, 1.0]  # baseline too


def test_a_failing_logger_warns_once_and_the_run_goes_on(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "lwpipe")
    final, records = run_recipe(FAST + ["+logger.broken._target_=tests.loggers.test_loggers.Broken"], tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "logger.broken" in r.getMessage()]
    assert len(warnings) == 1 and "tracking server gone" in warnings[0]
    assert (tmp_path / "summary.json").is_file() and records[-1]["stage"] == "prune" and final["event"] == "final"


@pytest.mark.slow
def test_mlflow_server_gone_mid_run_warns_once(tmp_path, caplog, monkeypatch):
    """The server answers the start-up check, then goes away: one warning, a complete run directory."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.WARNING, "lwpipe")

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    port = server.server_address[1]
    t = threading.Thread(target=server.handle_request)  # one request: the health check; then gone
    t.start()
    try:
        final, records = run_recipe(
            FAST + ["logger=mlflow", f"logger.mlflow.tracking_uri=http://127.0.0.1:{port}"], tmp_path
        )
    finally:
        t.join()
        server.server_close()
    warnings = [r.getMessage() for r in caplog.records if "logger.mlflow" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "model.lwp").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["accuracy"] == final["accuracy"]


def test_unreachable_tracking_uri_is_a_clear_error_before_any_record(tmp_path):
    cfg = compose_recipe(FAST + ["logger=mlflow", "logger.mlflow.tracking_uri=http://127.0.0.1:9", "cache=false"])
    with pytest.raises(LwpipeError, match=r"logger\.mlflow\.tracking_uri='http://127.0.0.1:9': cannot reach"):
        run(validate(cfg), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_logger_lists_the_known_ones():
    with pytest.raises(MissingConfigException) as e:
        compose_recipe(["logger=nosuch"])
    assert all(name in str(e.value) for name in ("default", "mlflow", "tensorboard"))


def test_logger_without_target_names_the_key(tmp_path):
    cfg = compose_recipe(FAST + ["+logger.foo.x=1", "cache=false"])
    with pytest.raises(LwpipeError, match=r"logger\.foo\._target_.*known: console, jsonl, report, mlflow"):
        run(validate(cfg), tmp_path)


def test_console_rows_fit_80_columns():
    rec = {
        "step": 12,
        "stage": "quantize_embeddings",
        "event": "stage_end",
        "accuracy": 0.97212,
        "loss": 12.3456,
        "sparsity": 0.9262,
        "max_unique_weights": 1234567,
        "teacher_agreement": 0.9694,
        "compression_ratio": 142.4,
        "seconds": 12345.67,
        "cached": True,
    }
    assert len(format_header()) <= 80 and len(format_row(rec)) <= 80
    assert len(format_row({**rec, "metric": "perplexity", "quality": 12.5})) <= 80


def test_console_quality_column_lines_up():
    """A metric name wider than the column is marked as cut; values keep their decimals (17.10, not 17.1)."""
    assert format_header("perplexity").split()[2] == "perplexi~"
    rows = [format_row({"step": 1, "stage": "s", "metric": "perplexity", "quality": q}) for q in (17.1, 17.123, 9.5)]
    assert [r.split()[2] for r in rows] == ["17.10", "17.12", "9.5000"]
    assert len({len(r.rstrip()) for r in rows}) == 1


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(RECIPES) / "logger").glob("*.yaml")))
def test_every_shipped_logger_composes_with_the_defaults(name):
    top = validate(compose_recipe([f"logger={name}"])).top
    assert {"console", "jsonl", "report"} <= set(top.logger) and (name == "default" or name in top.logger)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # MLflow's SQL under SQLAlchemy 2.1
def test_a_multirun_is_one_experiment_with_runs_tagged_by_sweep_and_overrides(tmp_path, monkeypatch):
    """Parallel jobs (sweep=joblib) on the default store: they build one new database together, no job loses."""
    from mlflow import MlflowClient

    from tests.test_cli import lwpipe

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    sweep = tmp_path / "sweep"
    p = lwpipe(
        [
            "-m",
            "sweep=joblib",
            *FAST,
            "stages.prune.sparsity=0.3,0.6",
            "logger=mlflow",
            "threads=1",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert "logger.mlflow" not in p.stdout + p.stderr, p.stderr[-3000:]  # no job's tracking was switched off
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert sorted(e.name for e in c.search_experiments()) == ["Default", f"default sweep {sweep.name}"]
    exp = c.get_experiment_by_name(f"default sweep {sweep.name}")
    runs = sorted(c.search_runs([exp.experiment_id]), key=lambda r: r.data.tags["lwpipe.job"])
    assert [r.data.tags["lwpipe.job"] for r in runs] == ["0", "1"]
    assert {r.data.tags["lwpipe.sweep"] for r in runs} == {str(sweep.resolve())}
    assert [
        "stages.prune.sparsity=0.3" in runs[0].data.tags["lwpipe.overrides"],
        "stages.prune.sparsity=0.6" in runs[1].data.tags["lwpipe.overrides"],
    ] == [True, True]
    assert [r.data.params["stages.prune.sparsity"] for r in runs] == ["0.3", "0.6"]
    for r in runs:
        final = json.loads((sweep / r.data.tags["lwpipe.job"] / "summary.json").read_text())["final"]
        assert r.data.metrics["accuracy"] == final["accuracy"] and r.info.status == "FINISHED"
