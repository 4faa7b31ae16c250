"""The worked example of docs/plugins.md (examples/plugin_stage/), installed as a user installs it: a
distribution with one `lwpipe.stages` entry point on sys.path."""

import sys
from pathlib import Path

import pytest
import torch

from lwpipe import registry
from lwpipe.errors import ConfigError
from tests.helpers import TINY, compose_recipe, run_recipe

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin_stage"


@pytest.fixture
def installed(tmp_path, monkeypatch):
    info = tmp_path / "lwpipe_pow2_stage-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lwpipe-pow2-stage\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[lwpipe.stages]\npow2 = pow2_stage:PowersOfTwo\n")  # pyproject's line
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield
    registry.STAGES.pop("pow2", None)
    sys.modules.pop("pow2_stage", None)


def test_the_example_stage_runs_and_its_model_lwp_holds_powers_of_two(installed, tmp_path):
    import lwpipe

    final, records = run_recipe(TINY + ["pipeline=[train,pow2]", "stages.train.epochs=1"], tmp_path / "run")
    assert [r["stage"] for r in records if r["event"] == "stage_end"] == ["train", "pow2"]
    model = lwpipe.load(tmp_path / "run" / "model.lwp")
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for w in linears:
        nonzero = w[w != 0].abs()
        assert nonzero.numel() > 0 and torch.equal(torch.log2(nonzero), torch.log2(nonzero).round())


def test_the_example_refuses_to_follow_a_grid_by_its_declaration(installed):
    from lwpipe.config import validate

    with pytest.raises(ConfigError) as e:
        validate(compose_recipe(TINY + ["pipeline=[quantize,pow2]"]))
    assert str(e.value) == (
        "pipeline[1]='pow2': cannot follow ['quantize']: pow2 would move the weights off the integer grid "
        "quantize left; put pow2 before quantize"
    )


def test_the_example_needs_no_reference_as_a_one_shot_stage(installed):
    from lwpipe.config import validate
    from lwpipe.stages.order import needs_reference

    recipe = validate(compose_recipe(TINY + ["pipeline=[pow2]"]))
    assert not needs_reference(recipe.steps)


def test_the_examples_own_test_passes(installed):
    from test_pow2_stage import test_weights_become_signed_powers_of_two_or_zero  # the example's folder

    try:
        test_weights_become_signed_powers_of_two_or_zero()
    finally:
        sys.modules.pop("test_pow2_stage", None)
