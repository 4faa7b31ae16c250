"""Every shipped recipe validates; the Deep Compression ones run end to end from the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lwpipe.cli import RECIPES
from lwpipe.config import validate
from tests.helpers import compose_recipe

NAMES = sorted(p.stem for p in (Path(RECIPES) / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("name", NAMES)
def test_shipped_recipe_validates(name):
    needs_path = OmegaConf.is_missing(compose_recipe([f"recipe={name}"]).model, "path")  # model=hf & co.
    recipe = validate(compose_recipe([f"recipe={name}", *(["model.path=DIR"] if needs_path else [])]))
    assert recipe.top.name == name


def test_compression_recipes_run_the_full_chain():
    for name in ("default", "deep_compression_lenet300", "deep_compression_lenet5"):
        steps = validate(compose_recipe([f"recipe={name}"])).steps
        assert [s.type for s in steps] == ["train", "prune", "share", "quantize", "distill"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deep_compression_lenet300", "deep_compression_lenet5"])
def test_recipe_runs_from_the_cli(name, tmp_path):
    short = ["stages.train.epochs=1", "stages.prune.finetune.epochs=1", "stages.share.finetune.epochs=1",
             "stages.quantize.finetune.epochs=1", "stages.distill.epochs=1", "cache=false",
             f"hydra.run.dir={tmp_path}"]
    subprocess.run([sys.executable, "-m", "lwpipe.cli", f"recipe={name}", *short], check=True,
                   capture_output=True, cwd=Path(RECIPES).parent)
    summary = json.loads((tmp_path / "summary.json").read_text())
    share = next(r for r in summary["stages"] if r["stage"] == "share")
    assert share["max_unique_weights"] <= (256 if name.endswith("lenet5") else 64)
    assert summary["final"]["sparsity"] >= 0.9
