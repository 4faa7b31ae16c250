"""The ResNet-style CNN, generated 32x32 colour data, BatchNorm re-estimation and the resnet_cifar_like recipe."""

import pytest
import torch

import lwpipe
from lwpipe import checkpoint
from lwpipe.bn import recalibrate_bn
from lwpipe.data import load_textures
from lwpipe.models import ResNet
from tests.helpers import run_recipe

SHRINK = [
    "recipe=resnet_cifar_like",
    "data.n=240",
    "model.widths=[4,8]",
    "stages.train.epochs=1",
    "stages.prune.steps=1",
    "stages.prune.finetune.epochs=0",
    "stages.share.finetune.epochs=1",
    "stages.quantize.finetune.epochs=0",
    "stages.distill.epochs=1",
    "data.batch_size=32",
]


def test_textures_are_seeded_colour_32x32():
    a, b = load_textures(n=40, seed=3), load_textures(n=40, seed=3)
    x, y = a.train.tensors
    assert x.shape[1:] == (3, 32, 32) and set(y.tolist()) <= set(range(10))
    assert torch.equal(x, b.train.tensors[0]) and a.identity == b.identity
    assert a.identity != load_textures(n=40, seed=4).identity


def test_resnet_shapes_and_residual_projection():
    m = ResNet(widths=(4, 8), blocks=2)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(m.layers[2].shortcut) == 2 and len(m.layers[1].shortcut) == 0  # 1x1 conv + BN where it downsamples


def test_recalibrate_bn_gives_the_batch_statistics():
    torch.manual_seed(0)
    m = ResNet(widths=(4,)).eval()
    x = torch.randn(64, 3, 8, 8) * 3 + 1
    with torch.no_grad():
        m.conv1.weight.mul_(0.1)  # stale statistics: the running stats describe other weights
    assert recalibrate_bn(m, [(x[:32], None), (x[32:], None)])
    want = m.conv1(x).transpose(0, 1).flatten(1)
    assert torch.allclose(m.bn1.running_mean, want.mean(1), atol=1e-5)
    assert torch.allclose(m.bn1.running_var, want.var(1), rtol=1e-3)
    assert m.bn1.momentum == 0.1 and not m.training
    assert not recalibrate_bn(torch.nn.Linear(2, 2), [(x, None)])


@pytest.mark.slow
def test_resnet_recipe_runs_the_chain_and_round_trips(tmp_path):
    final, records = run_recipe(SHRINK, tmp_path)
    stages = [r["stage"] for r in records if r["event"] == "stage_end"]
    assert stages == ["train", "prune", "share", "quantize", "distill"]
    assert final["sparsity"] > 0.7 and final["max_unique_weights"] <= 16
    loaded = lwpipe.load(tmp_path / "model.lwp")
    model = checkpoint.load_state(ResNet(widths=(4, 8)), tmp_path / "checkpoints" / "05_distill.safetensors").eval()
    x = load_textures(n=240).test.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
