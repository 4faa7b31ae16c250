import pytest
import torch
from torch import nn

from lwpipe.config import TrainSettings, validate
from lwpipe.constraints import constraint, original_weight
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.kmeans import assign, init_centroids, kmeans_1d
from lwpipe.stages.prune import Prune, PruneConfig
from lwpipe.stages.share import Share, ShareConfig, share_layer
from lwpipe.training import fit
from tests.helpers import TINY, compose_recipe

INITS = ["linear", "density", "random", "kmeans++"]


def distinct_nonzero(w):
    return torch.unique(w[w != 0]).numel()


# -- kmeans_1d -----------------------------------------------------------------------
@pytest.mark.parametrize("init", ["linear", "density", "kmeans++"])  # Forgy may seed two in one cluster
def test_kmeans_finds_separated_clusters(init):
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    x = centers.repeat_interleave(500) + 0.01 * torch.randn(2000, generator=g)
    c, idx = kmeans_1d(x, 4, init, iters=100)
    assert torch.allclose(c.sort().values, centers, atol=0.01)
    assert torch.equal(c[idx].round(decimals=1), centers.repeat_interleave(500).round(decimals=1))


@pytest.mark.parametrize("init", INITS)
def test_kmeans_index_is_exact_nearest_centroid(init):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2))
    c, idx = kmeans_1d(x, 32, init)
    brute = (x[:, None] - c[None]).abs().argmin(1)
    assert torch.equal(c[idx], c[brute])  # equal distance ties may pick either index, never another value
    assert idx.shape == x.shape and c.shape == (32,)


def test_kmeans_error_beats_its_linear_start_and_shrinks_with_k():
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(3))
    start = init_centroids(x, 8, "linear").float()
    err_start = (start[assign(x, start)] - x).pow(2).mean()
    errs = [(c[i] - x).pow(2).mean() for c, i in (kmeans_1d(x, k) for k in (4, 8, 16))]
    assert errs[1] < 0.8 * err_start
    assert errs[0] > errs[1] > errs[2]


def test_kmeans_fewer_distinct_values_than_k():
    x = torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0])
    c, idx = kmeans_1d(x, 8)
    assert torch.unique(c[idx]).tolist() == [1.0, 2.0, 5.0]


def test_density_init_follows_quantiles():
    x = torch.cat([torch.zeros(900), torch.linspace(1, 10, 100)])
    assert (init_centroids(x, 4, "density") < 0.5).sum() >= 3  # 90% of the mass sits at 0
    assert (init_centroids(x, 4, "linear") < 0.5).sum() == 1


def test_random_init_is_seeded_samples():
    x = torch.randn(1000)
    a, b = init_centroids(x, 8, "random", seed=5), init_centroids(x, 8, "random", seed=5)
    assert torch.equal(a, b) and all(v in x.double() for v in a)


# -- share_layer -----------------------------------------------------------------------
def test_share_keeps_mask_and_limits_distinct_values(model, ctx):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)
    before = model[1].weight.detach().clone()
    share_layer(model[1], bits=2)
    w = model[1].weight.detach()
    assert torch.equal(w == 0, before == 0)
    assert distinct_nonzero(w) <= 4
    assert not original_weight(model[1]).requires_grad
    assert (w - before).abs().max() < (before.max() - before.min()) / 4  # close to the original weights


def test_share_without_mask_masks_existing_zeros():
    layer = nn.Linear(6, 5)
    with torch.no_grad():
        layer.weight[0] = 0
    share_layer(layer, bits=1)
    c = constraint(layer)
    assert c.mask is not None and not c.mask[0].any() and c.mask[1:].all()
    assert (layer.weight[0] == 0).all() and distinct_nonzero(layer.weight.detach()) <= 2


def test_centroid_gradient_is_sum_over_cluster():
    torch.manual_seed(0)
    layer = nn.Linear(10, 6)
    with torch.no_grad():
        layer.weight[:, :3] = 0  # these are masked and get no gradient
    share_layer(layer, bits=2)
    c = constraint(layer)
    g = torch.randn(6, 10)
    (layer.weight * g).sum().backward()
    expected = torch.stack([g[(c.index == k) & c.mask].sum() for k in range(4)])
    assert torch.allclose(c.centroids.grad, expected, atol=1e-6)


def test_finetune_trains_centroids_only_and_keeps_index(model, ctx):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)
    share_layer(model[1], bits=2)
    c = constraint(model[1])
    index, centroids, orig = c.index.clone(), c.centroids.detach().clone(), original_weight(model[1]).clone()
    fit(model, ctx.train_loader(), TrainSettings(epochs=3, lr=1e-2))
    assert torch.equal(c.index, index) and torch.equal(original_weight(model[1]), orig)
    assert not torch.equal(c.centroids.detach(), centroids)
    w = model[1].weight.detach()
    assert distinct_nonzero(w) <= 4 and torch.equal(w == 0, c.mask.logical_not() | (w == 0))
    assert (w[~c.mask] == 0).all()


def test_per_layer_bits_by_glob(model, ctx):
    Share(ShareConfig(bits=3, layers={"3": {"bits": 1}})).run(model, ctx)
    assert constraint(model[1]).centroids.numel() == 8
    assert constraint(model[3]).centroids.numel() == 2
    assert distinct_nonzero(model[3].weight.detach()) <= 2


def test_skip_leaves_layer_alone(model, ctx):
    Share(ShareConfig(bits=2, layers={"[13]": {"skip": True}})).run(model, ctx)
    assert constraint(model[1]) is None and constraint(model[3]) is None


def test_unknown_layer_pattern_is_refused(model):
    with pytest.raises(ConfigError, match="fc9"):
        Share.check_model(ShareConfig(layers={"fc9": {"bits": 2}}), model, "stages.share")


def test_bits_out_of_range_names_path():
    with pytest.raises(LwpipeError, match=r"stages\.share\.bits=0"):
        validate(compose_recipe(TINY + ["stages.share.bits=0"]))


def test_share_after_quantize_is_refused_with_reason():
    with pytest.raises(LwpipeError, match="off the integer grid"):
        validate(compose_recipe(TINY + ["pipeline=[train,quantize,share]"]))
