import pytest
import torch
from torch import nn

from lwpipe.constraints import (
    apply_spec,
    constraint,
    effective_tensors,
    ensure_constraint,
    layer_setting,
    model_spec,
    unknown_layer_patterns,
)


def test_mask_holds_through_gradient_steps():
    lin = nn.Linear(6, 4)
    mask = torch.rand(4, 6) > 0.5
    ensure_constraint(lin).set_mask(mask)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(8, 6)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(lin.weight != 0, mask & (lin.parametrizations.weight.original != 0))
    assert (lin.weight[~mask] == 0).all()


def test_codebook_gradients_are_grouped_by_cluster():
    lin = nn.Linear(3, 2, bias=False)
    c = ensure_constraint(lin)
    index = torch.tensor([[0, 1, 0], [1, 1, 0]])
    c.set_codebook(index, torch.tensor([0.5, -0.25]))
    x = torch.randn(5, 3)
    lin(x).sum().backward()
    dW = torch.ones(5, 2).T @ x  # dL/dW for L = sum(W x)
    expected = torch.stack([dW[index == 0].sum(), dW[index == 1].sum()])
    assert torch.allclose(c.centroids.grad, expected)
    assert torch.unique(lin.weight).numel() == 2


def test_fake_quant_is_on_grid_with_straight_through_gradient():
    lin = nn.Linear(4, 3, bias=False)
    c = ensure_constraint(lin)
    scale = torch.tensor(0.01)
    c.set_quant(8, -127, 127, scale, torch.tensor(0.0), None)
    w = lin.weight.detach()
    levels = w / scale
    assert (levels - torch.round(levels)).abs().max() < 1e-4  # on the grid, up to float division
    assert torch.round(levels).abs().max() <= 127
    lin(torch.ones(1, 4)).sum().backward()
    assert torch.equal(lin.parametrizations.weight.original.grad, torch.ones(3, 4))


def test_clipped_values_get_no_gradient():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[5.0, 0.01]]))
    c = ensure_constraint(lin)
    c.set_quant(4, -7, 7, torch.tensor(0.1), torch.tensor(0.0), None)
    assert lin.weight[0, 0].item() == torch.tensor(0.7).item()  # clamped to the top level
    lin(torch.ones(1, 2)).sum().backward()
    assert lin.parametrizations.weight.original.grad.tolist() == [[0.0, 1.0]]


def test_spec_round_trip_restores_constraints():
    src = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    c = ensure_constraint(src[0])
    c.set_mask(torch.rand(4, 4) > 0.3)
    c.set_codebook(torch.randint(0, 3, (4, 4)), torch.tensor([-0.2, 0.1, 0.3]))
    c.set_quant(4, -7, 7, torch.tensor(0.05), torch.tensor(0.0), None)
    dst = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    apply_spec(dst, model_spec(src))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst[0].weight, src[0].weight)
    assert constraint(dst[2]) is None
    assert not dst[0].parametrizations.weight.original.requires_grad


def test_effective_tensors_use_plain_names():
    m = nn.Sequential(nn.Linear(2, 2))
    ensure_constraint(m[0]).set_mask(torch.tensor([[True, False], [False, True]]))
    t = effective_tensors(m)
    assert set(t) == {"0.weight", "0.bias"} and t["0.weight"][0, 1] == 0


def test_layer_setting_exact_beats_glob_and_longest_glob_wins():
    layers = {"fc*": 1, "fc1*": 2, "fc1": 3}
    assert layer_setting("fc1", layers) == 3
    assert layer_setting("fc10", layers) == 2
    assert layer_setting("fc2", layers) == 1
    assert layer_setting("conv", layers, 0) == 0
    assert unknown_layer_patterns(nn.Sequential(nn.Linear(1, 1)), {"0": 1, "x*": 2}) == ["x*"]


def test_clone_does_not_share_parametrized_classes():
    from lwpipe.constraints import clone, set_half_bias

    m = nn.Sequential(nn.Linear(3, 2))
    ensure_constraint(m[0]).set_mask(torch.ones(2, 3, dtype=torch.bool))
    copy_ = clone(m)
    set_half_bias(m[0])  # adds a `bias` property to m[0]'s class only
    assert copy_(torch.randn(1, 3)).shape == (1, 2)
    assert type(copy_[0]) is not type(m[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero", [0.0, 3.0])
def test_weights_computed_without_gradient_equal_the_training_path_bit_for_bit(dtype, zero):
    from lwpipe.compressed import Compressed, _RoundSTE

    torch.manual_seed(0)
    w = (torch.randn(6, 40) * 0.1).to(dtype)
    w[0, :4] = torch.tensor([-1e-6, 1e-6, -0.0, 0.0])  # levels that round to -0.0 and +0.0
    c = Compressed(w.shape)
    scale = w.float().abs().reshape(6, 5, 8).amax(-1) / 7
    c.set_quant(4, -8, 7, scale, torch.full_like(scale, zero), 0, 8)
    with torch.no_grad():
        fast = c.fake_quant(w)
    slow = _RoundSTE.apply(w, *c.grid(), -8, 7)
    assert fast.dtype == slow.dtype and torch.equal(fast.view(torch.int32), slow.detach().view(torch.int32))
    leaf = w.float().requires_grad_()
    c.fake_quant(leaf).sum().backward()  # with a gradient: the straight-through estimator, as before
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
