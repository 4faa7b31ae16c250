import pytest
import torch
from safetensors.torch import save_file

from lwpipe.checkpoint import load_state, load_weights, save_state
from lwpipe.constraints import ensure_constraint
from lwpipe.errors import ConfigError
from lwpipe.models import LeNet5, LeNet300


@pytest.mark.parametrize("size", [8, 28])
def test_lenets_fit_both_input_sizes(size):
    x = torch.randn(2, 1, size, size)
    assert LeNet300(in_features=size * size)(x).shape == (2, 10)
    assert LeNet5(image_size=size)(x).shape == (2, 10)


def test_lenet5_is_the_caffe_shape_on_mnist():
    m = LeNet5(image_size=28)
    assert m.fc1.in_features == 800 and sum(p.numel() for p in m.parameters()) == 431080


def test_lenet300_param_count_matches_paper_on_mnist():
    assert sum(p.numel() for p in LeNet300().parameters()) == 266610


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_loads_safely(tmp_path, suffix):
    src = LeNet300(in_features=64)
    path = tmp_path / f"w{suffix}"
    save_file(src.state_dict(), str(path)) if suffix == ".safetensors" else torch.save(src.state_dict(), path)
    dst = load_weights(LeNet300(in_features=64), str(path))
    assert torch.equal(dst.fc1.weight, src.fc1.weight)


def test_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(LeNet300(in_features=784).state_dict(), path)
    with pytest.raises(
        ConfigError, match=r"model.checkpoint=.*does not fit.*fc1.weight: file \(300, 784\) vs model \(300, 64\)"
    ):
        load_weights(LeNet300(in_features=64), str(path))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fc1.weight": torch.zeros(1), "obj": object()}, path)
    with pytest.raises(ConfigError, match="not a readable weights file"):
        load_weights(LeNet300(in_features=64), str(path))


def test_missing_checkpoint():
    with pytest.raises(ConfigError, match="model.checkpoint='/nope.pt': file does not exist"):
        load_weights(LeNet300(), "/nope.pt")


def test_state_with_constraints_round_trips(tmp_path):
    m = LeNet300(in_features=64)
    c = ensure_constraint(m.fc1)
    c.set_mask(torch.rand(m.fc1.weight.shape) > 0.5)
    save_state(m, tmp_path / "s.safetensors")
    back = load_state(LeNet300(in_features=64), tmp_path / "s.safetensors")
    assert torch.equal(back.fc1.weight, m.fc1.weight) and (back.fc1.weight == 0).any()
