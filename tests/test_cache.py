"""The stage cache: a hit recomputes nothing, a change recomputes from the changed stage on,
damaged entries are never trusted, and cached prefixes give the numbers a full run gives."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from torch import nn

from lwpipe import cache, cache_dir, registry, runner
from lwpipe.config import validate
from lwpipe.errors import LwpipeError
from lwpipe.runner import build_data
from tests.helpers import TINY, compose_recipe, run_recipe

CHAIN = TINY + [
    "pipeline=[train,prune,share,quantize,distill]",
    "stages.train.epochs=6",
    "stages.train.lr=0.01",
    "stages.prune.sparsity=0.5",
    "stages.prune.finetune.epochs=1",
    "stages.share.finetune.epochs=1",
    "stages.quantize.finetune.epochs=1",
    "stages.distill.epochs=2",
]
TIMING = {"seconds", "eval_seconds", "cached"}


def numbers(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def cached_steps(records):
    return {r["step"]: r["cached"] for r in records if r["event"] == "stage_end"}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """CHAIN run once, filling a cache; each test works on a copy of that cache."""
    root = tmp_path_factory.mktemp("first")
    _, records = run_recipe(CHAIN + [f"cache.dir={root / 'cache'}"], root / "run")
    return root / "cache", records


@pytest.fixture
def cached_run(first, tmp_path):
    """Runs CHAIN (plus overrides) against a copy of the first run's cache in tmp_path/cache."""
    shutil.copytree(first[0], tmp_path / "cache")
    counter = iter(range(100))

    def go(extra=()):
        return run_recipe(CHAIN + [f"cache.dir={tmp_path / 'cache'}", *extra], tmp_path / f"run{next(counter)}")

    return go


@pytest.mark.slow
def test_identical_rerun_recomputes_nothing(first, cached_run, tmp_path, monkeypatch):
    cache_dir, first = first
    assert set(cached_steps(first).values()) == {False}
    for name in ("train", "prune", "share", "quantize", "distill"):  # any stage that runs fails the test
        monkeypatch.setattr(registry.get(name), "run", lambda *a, **k: pytest.fail("a cached stage ran"))
    calls = []
    for module, name in [
        (runner, "evaluate"),
        (runner, "measure"),
        (runner, "write_encoded"),
        (runner, "frozen_copy"),
        (runner.speed, "speed_record"),
        (runner.checkpoint, "save_state"),
    ]:
        monkeypatch.setattr(
            module,
            name,
            lambda *a, _f=getattr(module, name), _n=name, **k: (  # noqa: B008
                calls.append(_n) or _f(*a, **k)
            ),
        )
    _, again = cached_run()
    assert cached_steps(again) == {1: True, 2: True, 3: True, 4: True, 5: True}
    assert [r["cached"] for r in again] == [True] * len(again)  # the baseline is replayed too
    assert numbers(again) == numbers(first)  # epoch records are replayed too
    assert calls == []  # nothing evaluated, timed, encoded, copied or serialised: records and files come from the cache
    run1, run2 = cache_dir.parent / "run", tmp_path / "run0"
    assert (run2 / "model.lwp").read_bytes() == (run1 / "model.lwp").read_bytes()
    names = sorted(p.name for p in (run1 / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (run2 / "checkpoints").iterdir()) and len(names) == 5
    for n in names:
        assert (run2 / "checkpoints" / n).read_bytes() == (run1 / "checkpoints" / n).read_bytes()
    summary = [json.loads((d / "summary.json").read_text()) for d in (run1, run2)]
    assert numbers([summary[1]["final"]]) == numbers([summary[0]["final"]])


@pytest.mark.slow
def test_changing_stage_k_recomputes_from_k_on_and_matches_an_uncached_run(cached_run, tmp_path):
    _, changed = cached_run(["stages.share.bits=3"])
    assert cached_steps(changed) == {1: True, 2: True, 3: False, 4: False, 5: False}
    _, fresh = run_recipe(CHAIN + ["stages.share.bits=3", "cache=false"], tmp_path / "fresh")
    assert set(cached_steps(fresh).values()) == {False}
    assert numbers(changed) == numbers(fresh)  # a restored prefix (and teacher) is the computed one


def test_a_distill_sweep_point_reuses_every_earlier_stage(cached_run):
    _, point = cached_run(["stages.distill.alpha=0.3"])
    assert cached_steps(point) == {1: True, 2: True, 3: True, 4: True, 5: False}


@pytest.mark.parametrize(
    "damage",
    [
        "truncated state",
        "missing record",
        "garbage record",
        "other state",
        "record is a directory",
        "state is a directory",
    ],
)
def test_damaged_entries_are_recomputed(first, cached_run, tmp_path, damage):
    _, first = first
    keys = stage_keys(CHAIN + [f"cache.dir={tmp_path / 'cache'}"])
    state, record = (tmp_path / "cache" / f"{keys[2]}{ext}" for ext in (".safetensors", ".json"))  # share
    if damage == "truncated state":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "missing record":  # as if killed between writing the state and its record
        record.unlink()
    elif damage == "garbage record":
        record.write_text(record.read_text()[:50])
    elif damage.endswith("a directory"):  # rerun exited 1 with IsADirectoryError, and never recomputed
        damaged = record if damage.startswith("record") else state
        damaged.unlink()
        (damaged / "inside").mkdir(parents=True)
    else:
        state.write_bytes((tmp_path / "cache" / f"{keys[1]}.safetensors").read_bytes())
    _, again = cached_run()
    # keys follow the recipe, not the bytes: once share is recomputed, the later entries are good again
    assert cached_steps(again) == {1: True, 2: True, 3: False, 4: True, 5: True}
    assert numbers(again) == numbers(first)
    assert json.loads(record.read_text())["key"] == keys[2]  # and the entry is whole again


def test_cache_false_neither_reads_nor_writes(tmp_path):
    _, records = run_recipe(
        TINY + ["stages.train.epochs=2", "stages.prune.finetune.epochs=0", "cache=false"], tmp_path / "run"
    )
    assert not any(r["cached"] for r in records)
    assert not (tmp_path / "cache").exists()


def stage_keys(overrides):
    recipe = validate(compose_recipe(overrides))
    key = cache.initial_key(recipe.top, build_data(recipe.top.data).identity)
    keys = []
    for i, s in enumerate(recipe.steps, 1):
        key = cache.stage_key(key, i, s.name, s.type, s.config.model_dump(mode="json"))
        keys.append(key)
    return keys


def test_keys_follow_what_determines_a_stage(tmp_path):
    base = stage_keys(CHAIN)
    assert stage_keys(CHAIN) == base
    assert stage_keys(CHAIN + ["seed=1"])[0] != base[0]
    assert stage_keys(CHAIN + ["data.spread=2.0"])[0] != base[0]
    later = stage_keys(CHAIN + ["stages.quantize.bits=4"])
    assert later[:3] == base[:3] and later[3] != base[3] and later[4] != base[4]
    renamed = stage_keys(CHAIN + ["pipeline=[train,prune,share,quantize]"])
    assert renamed == base[:4]


def test_a_file_named_in_the_settings_keys_by_its_contents(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"one")
    settings = {"teacher": str(teacher), "alpha": 0.5}
    k1 = cache.stage_key("prev", 5, "distill", "distill", settings)
    teacher.write_bytes(b"two")
    assert cache.stage_key("prev", 5, "distill", "distill", settings) != k1


def test_initial_key_covers_the_checkpoint_contents(tmp_path):
    import torch

    from lwpipe.models import TinyMLP

    path = tmp_path / "w.pt"
    torch.save(TinyMLP().state_dict(), path)
    top = validate(compose_recipe(TINY + [f"model.checkpoint={path}"])).top
    k1 = cache.initial_key(top, "data")
    torch.save(TinyMLP().state_dict(), path)  # new random weights, same path
    assert cache.initial_key(top, "data") != k1


def test_initial_key_covers_the_task():
    """The task's loss trains every stage: the same model and data under another task are other entries."""
    top = validate(compose_recipe(TINY)).top
    k1 = cache.initial_key(top, "data")
    top.task.name = "embedding"
    assert cache.initial_key(top, "data") != k1


def test_initial_key_covers_what_model_path_holds(tmp_path, monkeypatch):
    """A model directory retrained in place (same model.path) must not replay the old model's entries."""
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"old weights")
    top = validate(compose_recipe(TINY)).top
    top.model["path"] = str(model_dir)  # the key reads it like a model=hf / sentence_transformer path
    k1 = cache.initial_key(top, "data")
    assert cache.initial_key(top, "data") == k1
    (model_dir / "model.safetensors").write_bytes(b"new weights")
    k2 = cache.initial_key(top, "data")
    assert k2 != k1
    monkeypatch.setattr(cache, "HASH_BELOW", 4)  # big files: keyed by size and mtime instead of hashed
    k3 = cache.initial_key(top, "data")
    os.utime(model_dir / "model.safetensors", ns=(1, 1))
    assert cache.initial_key(top, "data") != k3


@pytest.mark.parametrize(
    "override, message",
    [
        ("cache.dir=''", "cache.dir='': String should have at least 1 character"),
        ("cache.enabled=maybe", "cache.enabled='maybe': Input should be a valid boolean"),
        ("objective=[acc]", "objective.0='acc': Input should be 'accuracy', 'loss'"),
    ],
)
def test_bad_settings_name_key_value_and_what_is_allowed(override, message):
    with pytest.raises(LwpipeError) as e:
        validate(compose_recipe(TINY + [override]))
    assert message in str(e.value)


def test_cache_false_is_short_for_disabled():
    assert validate(compose_recipe(TINY + ["cache=false"])).top.cache.enabled is False


def test_an_edited_record_is_recomputed_with_a_warning(first, cached_run, tmp_path, caplog):
    _, first = first
    keys = stage_keys(CHAIN + [f"cache.dir={tmp_path / 'cache'}"])
    record = tmp_path / "cache" / f"{keys[2]}.json"  # share
    entry = json.loads(record.read_text())
    entry["records"][-1]["accuracy"] += 0.01  # one digit of a replayed result, as an editor would change it
    record.write_text(json.dumps(entry))
    with caplog.at_level("WARNING", logger="lwpipe"):
        _, again = cached_run()
    # keys follow the recipe, not the bytes: once share is recomputed, the later entries are good again
    assert cached_steps(again) == {1: True, 2: True, 3: False, 4: True, 5: True}
    assert numbers(again) == numbers(first)
    assert any("do not match their checksum" in r.getMessage() for r in caplog.records)


def test_stale_temporaries_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()  # a pid that has exited
    old, fresh = 3 * 3600, 5
    files = {
        f".a.safetensors.tmp{dead}": (old, True),
        f".b.json.tmp{dead}": (fresh, False),  # a minute's grace
        f".c.safetensors.tmp{os.getpid()}": (fresh, False),
        f".d.safetensors.tmp{os.getpid()}": (old, True),
        "e.safetensors": (old, False),
    }
    for name, (age, _) in files.items():
        (tmp_path / name).write_bytes(b"x")
        t = time.time() - age
        os.utime(tmp_path / name, (t, t))
    (tmp_path / f".f.json.tmp{dead}").write_bytes(b"x")
    os.utime(tmp_path / f".f.json.tmp{dead}", (time.time() - 120, time.time() - 120))  # dead owner, 2 min old
    cache.StageCache(tmp_path)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {name for name, (_, removed) in files.items() if not removed}


@pytest.mark.parametrize("directory", ["/proc", "/dev/null", "/dev/null/cache"])
def test_unwritable_cache_dir_is_refused_before_any_work(tmp_path, directory):
    with pytest.raises(LwpipeError, match=f"cache.dir='{directory}': cannot write there"):
        run_recipe(TINY + [f"cache.dir={directory}"], tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "recipe.yaml").exists()


@pytest.mark.parametrize("suffix", [".json", ".safetensors", ".lwp"])
def test_an_entry_file_that_is_a_directory_is_a_miss_and_the_entry_is_stored_again(tmp_path, suffix, caplog):
    records, model = [{"step": 1, "stage": "s", "event": "stage_end"}], nn.Linear(4, 4)
    cache.StageCache(tmp_path).store("k", model, records, b"lwp")
    (tmp_path / f"k{suffix}").unlink()
    (tmp_path / f"k{suffix}" / "inside").mkdir(parents=True)
    again = cache.StageCache(tmp_path)
    with caplog.at_level("WARNING", logger="lwpipe"):
        hit = again.claim("k", nn.Linear(4, 4))
        assert (again.file("k", ".lwp") is None) == (suffix != ".safetensors")
        again.store("k", model, records, b"lwp")  # over the directory
    assert hit == (records if suffix == ".lwp" else None)  # only the artifact copy lost: encoded again
    assert "is a directory" in caplog.text
    assert cache.StageCache(tmp_path).load("k", nn.Linear(4, 4)) == records and again.file("k", ".lwp") == b"lwp"
    (tmp_path / "k.json").unlink()
    (tmp_path / "k.json" / "inside").mkdir(parents=True)
    assert [e["key"] for e in cache_dir.prune(tmp_path, older_than=-1)] == ["k"]  # pruned, not IsADirectoryError
    assert list(tmp_path.iterdir()) == []


def test_an_entry_file_that_is_a_fifo_is_a_miss_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "k.json")
    found = []
    reader = threading.Thread(target=lambda: found.append(cache.StageCache(tmp_path).load_records("k")), daemon=True)
    reader.start()
    reader.join(5)
    assert found == [None]


def test_a_cached_export_stage_restores_the_files_it_wrote(tmp_path):
    args = TINY + [
        "pipeline=[train,export]",
        "stages.train.epochs=1",
        "+stages.export.format=sparse",
        f"cache.dir={tmp_path / 'cache'}",
    ]
    run_recipe(args, tmp_path / "a")
    _, records = run_recipe(args, tmp_path / "b")
    assert cached_steps(records) == {1: True, 2: True}
    for name in ("export.pt", "export.json"):  # the run reported them; a cached run had neither
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    (tmp_path / "cache" / f"{stage_keys(args)[1]}.out.export.pt").write_bytes(b"damaged")
    _, records = run_recipe(args, tmp_path / "c")
    assert cached_steps(records) == {1: True, 2: False}  # a lost file is no hit: the stage runs again
    assert (tmp_path / "c" / "export.pt").is_file() and (tmp_path / "c" / "export.json").is_file()
    assert not (tmp_path / "a" / "export.pt2").exists() and not (tmp_path / "b" / "export.pt2").exists()
