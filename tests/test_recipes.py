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
    for name in (
        "default",
        "deep_compression_lenet300",
        "deep_compression_lenet300_paper",
        "deep_compression_lenet5",
        "deep_compression_lenet5_paper",
    ):
        steps = validate(compose_recipe([f"recipe={name}"])).steps
        assert [s.type for s in steps] == ["train", "prune", "share", "quantize", "distill"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["deep_compression_lenet300", "deep_compression_lenet5", "deep_compression_lenet5_paper"]
)
def test_recipe_runs_from_the_cli(name, tmp_path):
    short = [
        "stages.train.epochs=1",
        "stages.prune.finetune.epochs=1",
        "stages.share.finetune.epochs=1",
        "stages.quantize.finetune.epochs=1",
        "stages.distill.epochs=1",
        "cache=false",
        f"hydra.run.dir={tmp_path}",
    ]
    subprocess.run(
        [sys.executable, "-m", "lwpipe.cli", f"recipe={name}", *short],
        check=True,
        capture_output=True,
        cwd=Path(RECIPES).parent,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    share = next(r for r in summary["stages"] if r["stage"] == "share")
    # the tuned recipes' codebooks: 3 bits (lenet300), 5-bit conv / 4-bit fc (lenet5); the paper's 8 / 5 bits
    assert share["max_unique_weights"] <= {"deep_compression_lenet300": 8, "deep_compression_lenet5": 32}.get(name, 256)
    assert summary["final"]["sparsity"] >= 0.9


def test_paper_recipes_keep_the_papers_settings():
    """Han et al. 2016, Table 1-2: the share of weights kept per layer and the codebook bits."""
    kept = {
        "deep_compression_lenet300_paper": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
        "deep_compression_lenet5_paper": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
    }
    for name, layers in kept.items():
        cfg = compose_recipe([f"recipe={name}"])
        assert {n: round(1 - s.sparsity, 2) for n, s in cfg.stages.prune.layers.items()} == layers
    assert compose_recipe(["recipe=deep_compression_lenet300_paper"]).stages.share.bits == 6
    share = compose_recipe(["recipe=deep_compression_lenet5_paper"]).stages.share.layers
    assert (share["conv*"].bits, share["fc*"].bits) == (8, 5)
