"""lwpipe/stages/base.py: the stage contract, and what a plugin that declares nothing gets."""

import logging

import pytest
from pydantic import BaseModel

from lwpipe import cache, registry
from lwpipe.stages.base import DECLARATIONS, Stage, finish_declarations


class Empty(BaseModel):
    pass


@pytest.fixture
def cleanup():
    yield
    for name in ("bare", "flagged", "declared"):
        registry.STAGES.pop(name, None)


def test_a_plugin_that_declares_nothing_gets_conservative_defaults_and_a_warning(cleanup, caplog):
    bare = type("Bare", (), {"Config": Empty, "__init__": lambda self, cfg: None, "run": lambda self, m, c: m})
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        cls = registry.register("bare", plugin=True)(bare)
    assert issubclass(cls, Stage) and issubclass(cls, bare) and registry.STAGES["bare"] is cls
    assert cls.trains and cls.needs_reference and cls.leaves is None and cls.refuses == {}
    assert cls.uses_reference(Empty())
    (message,) = [r.getMessage() for r in caplog.records]
    assert "'bare'" in message and "does not declare " + ", ".join(DECLARATIONS) in message
    assert "may not be reordered" in message


def test_the_older_compresses_flag_counts_as_declaring_leaves(cleanup, caplog):
    flagged = type("Flagged", (), {"Config": Empty, "compresses": False})
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        cls = registry.register("flagged", plugin=True)(flagged)
    assert cls.leaves == ()
    assert "leaves" not in caplog.records[0].getMessage().split("does not declare")[1].split(":")[0]


def test_a_stage_that_declares_everything_is_not_warned_about(cleanup, caplog):
    declared = type(
        "Declared",
        (Stage,),
        {"Config": Empty, "leaves": (), "trains": False, "needs_calibration": False, "needs_reference": False}
        | {"needs_gradients": False},
    )
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        assert registry.register("declared", plugin=True)(declared) is declared
    assert caplog.records == []
    assert finish_declarations(declared) == (declared, [])
    assert not declared.uses_reference(Empty())


def test_a_plugins_source_file_is_part_of_its_cache_key(tmp_path, monkeypatch):
    import importlib
    import sys

    source = tmp_path / "keyed_plugin.py"
    source.write_text("class K:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("keyed_plugin")
    try:
        before = cache.stage_source(module.K)
        source.write_text("class K:\n    x = 1\n")
        assert before is not None and cache.stage_source(module.K) != before
        key = cache.stage_key("prev", 1, "k", "k", {}, before)
        assert key != cache.stage_key("prev", 1, "k", "k", {}, cache.stage_source(module.K))
    finally:
        sys.modules.pop("keyed_plugin", None)
    assert cache.stage_source(registry.get("prune")) is None  # lwpipe's own: covered by code_version()
