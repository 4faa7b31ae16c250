"""Low-rank factorization: ranks, the SVD factors, order and rank checks, and the artifact round trip."""

import logging

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import lwpipe
from lwpipe.config import validate
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.lowrank import factorize_linear, rank_for, restore_factorized
from lwpipe.models import TinyMLP
from lwpipe.stages.factorize import Factorize, FactorizeConfig
from tests.helpers import TINY, compose_recipe, run_recipe


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert rank_for(s, None, None, 16 / 22) == 1 and rank_for(s, None, None, 0.8) == 2
    assert rank_for(s, None, None, 1.0) == 4 and rank_for(s, None, 0.5, None) == 2 and rank_for(s, 3, None, None) == 3


def test_factors_are_the_truncated_svd():
    torch.manual_seed(0)
    m = nn.Linear(12, 10)
    x = torch.randn(5, 12)
    full = factorize_linear(m, 10)
    assert torch.allclose(full(x), m(x), atol=1e-5)
    low = factorize_linear(m, 3)
    s = torch.linalg.svdvals(m.weight.detach())
    w = low[1].weight @ low[0].weight
    assert float(torch.linalg.norm(w.detach() - m.weight.detach())) == pytest.approx(
        float(s[3:].pow(2).sum().sqrt()), rel=1e-4
    )
    assert low[0].bias is None and torch.equal(low[1].bias, m.bias)


def test_stage_replaces_the_layer_when_it_saves(model, ctx):
    x = torch.randn(4, 8)
    Factorize(FactorizeConfig(layers=["1"], rank=2)).run(model, ctx)
    assert isinstance(model[1], nn.Sequential) and model[1][0].weight.shape == (2, 8)
    assert model(x).shape == (4, 4)
    Factorize(FactorizeConfig(layers=["3"], energy=1.0)).run(model, ctx)  # full rank saves nothing: kept
    assert isinstance(model[3], nn.Linear)


def test_restore_rebuilds_only_consistent_shapes():
    m = TinyMLP()
    restore_factorized(
        m, {"1.0.weight": (3, 8), "1.1.weight": (16, 3), "1.1.bias": (16,), "3.0.weight": (9, 16), "3.1.weight": (4, 9)}
    )  # rank 9 > min(16, 4): left alone
    assert isinstance(m[1], nn.Sequential) and m[1][1].bias is not None and isinstance(m[3], nn.Linear)


def test_bad_settings_name_key_and_value(model):
    with pytest.raises(ValidationError, match="set exactly one of rank, ratio, energy"):
        FactorizeConfig(rank=2, energy=0.9)
    with pytest.raises(ValidationError, match="energy"):
        FactorizeConfig(energy=1.5)
    with pytest.raises(
        ConfigError, match=r"stages.factorize.rank=9: is larger than layer 1 \[16, 8\] can have \(at most 8\)"
    ):
        Factorize.check_model(FactorizeConfig(rank=9), model, "stages.factorize")
    with pytest.raises(ConfigError, match=r"layers\[0\]='fc9'"):
        Factorize.check_model(FactorizeConfig(layers=["fc9"], rank=2), model, "stages.factorize")


def test_factorize_after_prune_is_refused():
    with pytest.raises(LwpipeError, match=r"pipeline\[2\]='factorize'.*put factorize before prune"):
        validate(compose_recipe(TINY + ["pipeline=[train,prune,factorize]", "+stages.factorize.rank=2"]))


def test_factorized_pruned_quantized_model_round_trips(tmp_path):
    final, _ = run_recipe(
        TINY
        + [
            "pipeline=[train,factorize,prune,quantize]",
            "+stages.factorize.rank=3",
            "+stages.factorize.layers=['1']",
            "stages.quantize.bits=1",
            "logger.console=null",
        ],
        tmp_path,
    )
    loaded = lwpipe.load(tmp_path / "model.lwp", constrained=True)
    assert isinstance(loaded[1], nn.Sequential) and loaded[1][0].weight.shape == (3, 8)
    from lwpipe import checkpoint

    state = sorted((tmp_path / "checkpoints").glob("*quantize*"))[0]
    again = checkpoint.load_state(TinyMLP(**{}), state)
    x = torch.randn(16, 8)
    assert torch.equal(loaded(x), again.eval()(x))
    assert (loaded[1][0].weight == 0).any()  # pruned factors


@pytest.mark.parametrize("conv", [nn.Conv2d(12, 10, 1, stride=2, padding=1), nn.Conv1d(12, 10, 1)])
def test_a_1x1_convolution_factorizes_like_a_linear(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 7, 7) if isinstance(conv, nn.Conv2d) else torch.randn(2, 12, 9)
    full = factorize_linear(conv, 10)  # full rank: the same function, stride and padding kept
    assert isinstance(full[0], type(conv)) and torch.allclose(full(x), conv(x), atol=1e-5)
    low = factorize_linear(conv, 3)
    assert low[0].weight.shape[:2] == (3, 12) and low[1].weight.shape[:2] == (10, 3)
    s = torch.linalg.svdvals(conv.weight.detach().reshape(10, 12))
    w = (low[1].weight.reshape(10, 3) @ low[0].weight.reshape(3, 12)).detach()
    assert float(torch.linalg.norm(w - conv.weight.detach().reshape(10, 12))) == pytest.approx(
        float(s[3:].pow(2).sum().sqrt()), rel=1e-4
    )


@pytest.mark.slow
def test_resnet_shortcut_1x1_convs_factorize_and_the_artifact_rebuilds_them(tmp_path):
    from lwpipe.models import ResNet

    final, _ = run_recipe(
        [
            "recipe=resnet_cifar_like",
            "data.n=120",
            "model.widths=[8,16]",
            "logger.console=null",
            "pipeline=[train,factorize,quantize]",
            "stages.train.epochs=1",
            "+stages.factorize.rank=2",
            "+stages.factorize.layers=['*shortcut.0']",
            "stages.quantize.finetune.epochs=0",
        ],
        tmp_path,
    )
    loaded = lwpipe.load(tmp_path / "model.lwp")
    sc = loaded.layers[1].shortcut[0]
    assert isinstance(sc, nn.Sequential) and sc[0].weight.shape == (2, 8, 1, 1) and sc[0].stride == (2, 2)
    from lwpipe import checkpoint

    again = checkpoint.load_state(ResNet(widths=(8, 16)), sorted((tmp_path / "checkpoints").glob("*quantize*"))[0])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), again.eval()(x))


@pytest.mark.parametrize(
    "extra, warned",
    [
        ([], "sparsity=0.9, meant for whole layers, also prunes the low-rank factors of the layers '*'"),
        (["++stages.factorize.layers=[fc1]"], "factors of the layers 'fc1'"),
        (["++stages.prune.quality=1.0"], "its quality/threshold rule"),
        (["stages.prune.sparsity=0.5"], None),  # measured to keep accuracy
        (["++stages.prune.granularity=nm"], None),  # 2:4 is sparsity 0.5
        (["++stages.prune.granularity=nm", "++stages.prune.n=1"], "sparsity=0.75"),
        (["++stages.factorize.layers=[fc1]", "++stages.prune.layers={fc1*: {sparsity: 0.6}}"], None),  # own setting
        (
            ["++stages.factorize.layers=[fc1]", "++stages.prune.layers={fc1: {sparsity: 0.6}}"],  # names fc1, not its
            "factors of the layers 'fc1'",
        ),  # factors fc1.0/.1
        (["pipeline=[train,prune,factorize]"], "refused"),
    ],
)
def test_prune_after_factorize_at_whole_layer_settings_warns(caplog, extra, warned):
    overrides = ["pipeline=[train,factorize,prune,share,quantize,distill]", "++stages.factorize.energy=0.9", *extra]
    with caplog.at_level(logging.WARNING, logger="lwpipe"):
        if warned == "refused":  # the other order stays refused, without the warning
            with pytest.raises(LwpipeError, match="put factorize before prune"):
                validate(compose_recipe(overrides))
            warned = None
        else:
            validate(compose_recipe(overrides))
    notes = [r.getMessage() for r in caplog.records if "prune after factorize" in r.getMessage()]
    assert (warned in notes[0] and len(notes) == 1) if warned else not notes, notes
