import sys
import textwrap

import pytest

from lwpipe.errors import LwpipeError
from lwpipe.stages import registry
from tests.helpers import TINY, run_recipe

PLUGIN = '''
from pydantic import BaseModel, ConfigDict, Field
import torch

class ScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = Field(0.5, ge=0)

class Scale:
    """Multiplies every parameter by `factor`: visible in the metrics."""
    Config = ScaleConfig
    compresses = False
    def __init__(self, cfg):
        self.cfg = cfg
    def run(self, model, ctx):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(self.cfg.factor)
        return model
'''


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path) declaring a lwpipe.stages entry point."""
    (tmp_path / "lwp_demo_plugin.py").write_text(PLUGIN)
    info = tmp_path / "lwp_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lwp-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""
        [lwpipe.stages]
        scale = lwp_demo_plugin:Scale
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield
    registry.STAGES.pop("scale", None)
    sys.modules.pop("lwp_demo_plugin", None)


def test_builtin_stages_registered():
    assert {"train", "prune"} <= set(registry.known())


def test_entry_point_plugin_is_found_and_runs(plugin_dist, tmp_path):
    assert registry.get("scale").__name__ == "Scale"
    final, records = run_recipe(TINY + ["pipeline=[scale]", "+stages.scale.factor=0.0"], tmp_path / "run")
    assert records[-1]["stage"] == "scale" and final["nonzero_params"] == 0


def test_plugin_settings_are_validated(plugin_dist):
    from lwpipe.config import validate
    from tests.helpers import compose_recipe

    with pytest.raises(LwpipeError, match=r"stages.scale.factor=-1.0"):
        validate(compose_recipe(TINY + ["pipeline=[scale]", "+stages.scale.factor=-1.0"]))


def test_broken_plugin_says_so(tmp_path, monkeypatch):
    info = tmp_path / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lwpipe.stages]\nbroken = no_such_module_xyz:Stage\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(LwpipeError, match="stage plugin 'broken'.*failed to import"):
        registry.load_plugins()


def test_register_requires_config():
    with pytest.raises(TypeError, match="needs a pydantic Config"):
        registry.register("nocfg")(type("NoCfg", (), {}))


def test_the_older_name_is_the_same_registry():
    """Plugins written against `lwpipe.registry` register where lwpipe looks stages up."""
    import lwpipe.registry
    import lwpipe.stages.registry

    assert lwpipe.registry is lwpipe.stages.registry
    assert lwpipe.registry.register is registry.register and lwpipe.registry.STAGES is registry.STAGES
