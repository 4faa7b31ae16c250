"""Compose recipes the way the CLI does, and run them in-process on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lwpipe.cli import RECIPES
from lwpipe.config import validate
from lwpipe.runner import run

TINY = ["model=tiny", "data=blobs", "~stages.prune.layers"]


def compose_recipe(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=RECIPES, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def run_recipe(overrides: list[str], run_dir: Path) -> tuple[dict, list[dict]]:
    """Run in-process; returns the final record and the metrics.jsonl records."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not any(o.lstrip("+~").startswith("cache") for o in overrides):
        overrides = [*overrides, "cache=false"]  # no stage cache in the repository's outputs/ unless asked for
    if not any(o.lstrip("+~").startswith("measure") for o in overrides):
        overrides = [*overrides, "measure.latency=false"]  # timing is for benchmarks, not tests
    final = run(validate(compose_recipe(overrides)), run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return final, records
