"""Settings that pass their bounds but make no sense are refused or warned about, in words."""

import logging

import pytest
import torch

from lwpipe.config import validate
from lwpipe.constraints import constraint
from lwpipe.errors import LwpipeError
from lwpipe.models import TinyMLP
from lwpipe.stages.share import share_layer
from lwpipe.training import warn_if_diverging
from tests.helpers import TINY, compose_recipe, run_recipe

QUICK = TINY + ["stages.train.epochs=2", "stages.prune.finetune.epochs=0"]


def test_sparsity_that_rounds_to_a_whole_layer_is_refused(tmp_path):
    with pytest.raises(
        LwpipeError,
        match=r"stages.prune.sparsity=0.999999: rounds to pruning all 128 weights of "
        r"layer 1; a layer may never be pruned to nothing",
    ):
        run_recipe(QUICK + ["stages.prune.sparsity=0.999999"], tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any work


def test_codebook_is_capped_at_the_layers_distinct_values():
    torch.manual_seed(0)
    layer = TinyMLP(in_features=8, hidden=4, num_classes=2)[3]  # 4 x 2 = 8 weights
    share_layer(layer, bits=16)
    c = constraint(layer)
    assert c.centroids.numel() == 8  # not 65,536


@pytest.mark.slow
def test_a_stage_that_makes_the_artifact_larger_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        run_recipe(
            QUICK + ["pipeline=[train,prune,share]", "stages.share.bits=16", "stages.share.finetune.epochs=0"],
            tmp_path / "big",
        )
    assert any("stage share made model.lwp larger" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        run_recipe(
            QUICK + ["pipeline=[train,prune,share]", "stages.share.bits=2", "stages.share.finetune.epochs=0"],
            tmp_path / "small",
        )
    assert not any("larger" in r.getMessage() for r in caplog.records)


def test_nan_learning_rate_is_not_a_number():
    with pytest.raises(LwpipeError, match=r"stages.train.lr=nan: not a number"):
        validate(compose_recipe(TINY + ["stages.train.lr=nan"]))


@pytest.mark.parametrize(
    "loss, first, warned",
    [(float("nan"), 1.0, "diverged"), (float("inf"), 1.0, "diverged"), (1e6, 1.4, "diverging"), (2.0, 1.4, None)],
)
def test_diverging_loss_is_warned_about(caplog, loss, first, warned):
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        warn_if_diverging(3, loss, first)
    assert (warned in caplog.text) if warned else caplog.text == ""


def test_a_diverging_run_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        run_recipe(TINY + ["pipeline=[train]", "stages.train.epochs=2", "stages.train.lr=10"], tmp_path / "run")
    assert "training is diverging" in caplog.text or "training diverged" in caplog.text
