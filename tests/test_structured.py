"""Structured pruning shrinks layers: channel groups from the fx graph, exact removal, artifact round trip."""

import pytest
import torch
from torch import nn

import lwpipe
from lwpipe import checkpoint, structured
from lwpipe.artifact import read
from lwpipe.errors import ConfigError
from lwpipe.models import LeNet5, ResNet
from lwpipe.stages.prune import Prune, PruneConfig
from tests.helpers import run_recipe

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_groups_keep_residual_additions_aligned():
    groups = {tuple(sorted(g.producers)): g for g in structured.channel_groups(ResNet(widths=(4, 8)), X)}
    res = groups[("layers.1.conv2", "layers.1.shortcut.0")]  # both sides of the residual add
    assert sorted(res.norms) == ["layers.1.bn2", "layers.1.shortcut.1"] and res.consumers == [("fc", 1)]
    assert not any("fc" in p for p in groups)  # the logits are the output: never pruned
    lenet = structured.channel_groups(LeNet5(1, 8), torch.randn(2, 1, 8, 8))
    assert [(g.producers, g.consumers) for g in lenet][1] == (["conv2"], [("fc1", 4)])  # flatten: 2x2 per channel


@torch.no_grad()
def test_removing_dead_channels_leaves_outputs_unchanged():
    torch.manual_seed(0)
    m = ResNet(widths=(4, 8), blocks=2).eval()
    for bn in m.modules():  # non-trivial statistics
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    dead = [1, 6]  # in the second stage's residual stream: every tensor added there carries them
    for conv, bn in [
        ("layers.2.conv2", "layers.2.bn2"),
        ("layers.2.shortcut.0", "layers.2.shortcut.1"),
        ("layers.3.conv2", "layers.3.bn2"),
    ]:
        mods = dict(m.named_modules())
        mods[conv].weight[dead] = 0
        mods[bn].weight[dead] = 0
        mods[bn].bias[dead] = 0
    before = m(X)
    widths = structured.prune_channels(
        m, X, {"layers.2.conv2": 0.25, "layers.2.shortcut.0": 0.25, "layers.3.conv2": 0.25}, {}
    )
    assert widths["layers.2.shortcut.0"] == 6 and m.fc.in_features == 6 and m.layers[3].conv1.in_channels == 6
    assert m.layers[3].bn2.num_features == 6
    torch.testing.assert_close(m(X), before, rtol=1e-5, atol=1e-5)


def test_untraceable_model_is_named_and_falls_back_only_when_allowed():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it

    model = nn.Sequential(nn.Linear(4, 4), Branchy())
    with pytest.raises(ConfigError, match=r"stages.prune.granularity=.*module 1 \(Branchy\)"):
        Prune.check_model(PruneConfig(granularity="structured"), model, "stages.prune")
    Prune.check_model(PruneConfig(granularity="structured", untraceable="mask"), model, "stages.prune")


def test_structured_recipe_shrinks_and_the_artifact_rebuilds_the_shapes(tmp_path):
    final, records = run_recipe(
        [
            "recipe=resnet_cifar_like",
            "data.n=120",
            "model.widths=[8,16]",
            "pipeline=[train,prune,quantize]",
            "stages.train.epochs=1",
            "+stages.prune.granularity=structured",
            "stages.prune.sparsity=0.5",
            "~stages.prune.layers",
            "stages.prune.finetune.epochs=1",
            "stages.quantize.finetune.epochs=0",
        ],
        tmp_path,
    )
    base = records[0]
    assert final["params"] < 0.4 * base["params"] and final["macs"] < 0.4 * base["macs"]
    # the ratio counts against the model the user started with, not the shrunken one
    assert final["compression_ratio"] == base["dense_bytes"] / (tmp_path / "model.lwp").stat().st_size
    assert final["dense_bytes"] < 0.4 * base["dense_bytes"]
    plain = ResNet(widths=(8, 16))
    model = checkpoint.load_state(plain, tmp_path / "checkpoints" / "03_quantize.safetensors").eval()
    assert model.layers[0].conv1.out_channels == 4 and model.fc.in_features == 8
    loaded = lwpipe.load(tmp_path / "model.lwp")
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert read((tmp_path / "model.lwp").read_bytes()).header["resized"] is True  # only so may it shrink a model


def test_a_model_is_resized_only_when_a_layer_is_smaller_than_built():
    from lwpipe.structured import layer_shapes, resize_to, resized

    built = ResNet(widths=(8, 16))
    shapes = layer_shapes(built)
    assert not resized(built, shapes) and not hasattr(built, "lwpipe_resized")
    smaller = {f"{n}.weight": s for n, s in layer_shapes(built).items()} | {"layers.0.conv1.weight": (4, 8, 3, 3)}
    resize_to(built, smaller)
    assert resized(built, shapes) and not hasattr(built, "lwpipe_resized")  # the caller says so, not the model


def test_structured_after_share_is_refused_at_validation():
    from lwpipe.config import validate
    from tests.helpers import TINY, compose_recipe

    with pytest.raises(ConfigError, match="prune before share/quantize"):
        validate(compose_recipe([*TINY, "pipeline=[train,share,prune]", "+stages.prune.granularity=structured"]))
