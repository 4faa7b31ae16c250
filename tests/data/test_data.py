import gzip
import struct

import numpy as np
import pytest

from lwpipe.data import load_blobs, load_digits, load_mnist
from lwpipe.errors import ConfigError, LwpipeError


def write_idx(path, array, compress=False):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)), compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20), compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (7, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 7))
    return tmp_path


def test_digits_split_is_fixed_and_held_out():
    a, b = load_digits(), load_digits()
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 359
    assert a.identity == b.identity
    assert a.identity != load_digits(split_seed=1).identity
    x, y = a.train.tensors
    assert x.shape[1:] == (1, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_mnist_reads_idx_plain_and_gz(mnist_dir):
    d = load_mnist(str(mnist_dir))
    assert d.train.tensors[0].shape == (20, 1, 28, 28) and d.test.tensors[0].shape == (7, 1, 28, 28)
    with gzip.open(mnist_dir / "train-images-idx3-ubyte.gz") as f:
        raw = f.read()
    assert d.train.tensors[0][0, 0, 0, 0].item() == pytest.approx(raw[16] / 255.0)


def test_mnist_missing_dir_names_key():
    with pytest.raises(ConfigError, match=r"data.root='/no/such/dir': directory does not exist.*train-images"):
        load_mnist("/no/such/dir")


def test_mnist_missing_file(mnist_dir):
    (mnist_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte\\[.gz\\] not found"):
        load_mnist(str(mnist_dir))


def test_mnist_truncated_file(mnist_dir):
    p = mnist_dir / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(LwpipeError, match="truncated"):
        load_mnist(str(mnist_dir))


def test_blobs_are_seeded():
    assert load_blobs(seed=3).identity == load_blobs(seed=3).identity != load_blobs(seed=4).identity


def test_digits_read_directly_equal_scikit_learns():
    from sklearn.datasets import load_digits as sk_digits

    from lwpipe.data.digits import _read_digits

    images, target = _read_digits()
    d = sk_digits()
    assert (images == d.images).all() and (target == d.target).all()


def test_mnist_truncated_header_names_file_and_expectation(mnist_dir):
    p = mnist_dir / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:10])
    with pytest.raises(LwpipeError, match=r"t10k-images-idx3-ubyte: truncated header: 10 bytes.*16 bytes"):
        load_mnist(str(mnist_dir))


@pytest.mark.parametrize(
    "case, message",
    [
        ("label 200", r"t10k-labels-idx1-ubyte: label 200 at sample 3; MNIST labels are 0..9"),
        ("2-D labels", r"t10k-labels-idx1-ubyte: holds a 2-dimensional array, expected labels"),
        ("swapped", r"train-images-idx3-ubyte.gz: holds a 1-dimensional array, expected images"),
        ("test images 20x20", r"t10k-images-idx3-ubyte: images of \(20, 20\) pixels.*\(28, 28\)"),
        ("empty test set", r"t10k-labels-idx1-ubyte: holds no labels"),
    ],
)
def test_mnist_bad_contents_name_the_file(mnist_dir, case, message):
    rng = np.random.default_rng(1)
    if case == "label 200":
        write_idx(mnist_dir / "t10k-labels-idx1-ubyte", np.array([1, 2, 3, 200, 4, 5, 6]))
    elif case == "2-D labels":
        write_idx(mnist_dir / "t10k-labels-idx1-ubyte", rng.integers(0, 10, (7, 2)))
    elif case == "swapped":
        write_idx(mnist_dir / "train-images-idx3-ubyte.gz", rng.integers(0, 10, 20), compress=True)
        write_idx(mnist_dir / "train-labels-idx1-ubyte.gz", rng.integers(0, 256, (20, 28, 28)), compress=True)
    elif case == "test images 20x20":
        write_idx(mnist_dir / "t10k-images-idx3-ubyte", rng.integers(0, 256, (7, 20, 20)))
    else:
        write_idx(mnist_dir / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28)))
        write_idx(mnist_dir / "t10k-labels-idx1-ubyte", np.zeros(0))
    with pytest.raises(LwpipeError, match=message):
        load_mnist(str(mnist_dir))


def bundle(train_x, train_y, test_x, test_y):
    from torch.utils.data import TensorDataset

    from lwpipe.data import DataBundle

    return DataBundle(TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), name="mine")


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "label 200",
            r"data='mine': the train split has label 200 \(sample 2\); the model scores 8 classes, so labels "
            r"must be 0..7",
        ),
        ("negative label", r"the test split has label -5 \(sample 4\)"),
        ("2-D labels", r"the train labels have shape \(5, 2\); expected one integer per sample"),
        ("shapes differ", r"train inputs are \(32,\) but test inputs are \(16,\)"),
        ("empty test", r"data='mine': the test split is empty"),
    ],
)
def test_generic_checks(case, message):
    import torch

    from lwpipe.data.checks import check_data
    from lwpipe.models import TinyMLP

    x, y = torch.randn(5, 32), torch.tensor([0, 1, 2, 3, 4])
    args = {
        "label 200": (x, torch.tensor([0, 1, 200, 3, 4]), x, y),
        "negative label": (x, y, x, -y - 1),
        "2-D labels": (x, torch.zeros(5, 2, dtype=torch.long), x, y),
        "shapes differ": (x, y, x[:, :16], y),
        "empty test": (x, y, x[:0], y[:0]),
    }[case]
    with pytest.raises(ConfigError, match=message):
        check_data(bundle(*args), TinyMLP(in_features=32, hidden=4, num_classes=8))
    check_data(bundle(x, y, x, y), TinyMLP(in_features=32, hidden=4, num_classes=8))  # good data passes


def test_runner_checks_labels_before_any_work(tmp_path):
    from tests.helpers import TINY, run_recipe

    with pytest.raises(ConfigError, match="the model scores 2 classes"):
        run_recipe(TINY + ["model.num_classes=2"], tmp_path / "run")
    assert not any((tmp_path / "run").iterdir())


def test_mnist_gzip_bomb_is_refused_while_streaming(mnist_dir, monkeypatch):
    """A .gz decompressing far beyond its IDX header's size: refused after reading the declared bytes + 1."""
    path = mnist_dir / "train-images-idx3-ubyte.gz"
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 20, 28, 28)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(20 * 28 * 28))
        for _ in range(64):
            f.write(bytes(1 << 16))  # 4 MiB more than declared, about 4 KB compressed
    read = []
    original = gzip.GzipFile.read

    def counting(self, size=-1):
        out = original(self, size)
        read.append(len(out))
        return out

    monkeypatch.setattr(gzip.GzipFile, "read", counting)
    with pytest.raises(
        LwpipeError,
        match=r"train-images-idx3-ubyte.gz: decompresses to more than the 15,680 "
        r"bytes its header \(20, 28, 28\) declares",
    ):
        load_mnist(str(mnist_dir))
    assert sum(read) <= 16 + 20 * 28 * 28 + 1


def test_mnist_header_larger_than_a_gzip_file_can_hold(mnist_dir):
    write_idx(mnist_dir / "train-labels-idx1-ubyte.gz", np.zeros(0))
    path = mnist_dir / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 4_000_000_000) + bytes(20))
    with pytest.raises(
        LwpipeError,
        match=r"header says \(4000000000,\) \(4,000,000,000 bytes\), more than a "
        r"\d+-byte gzip file can hold",
    ):
        load_mnist(str(mnist_dir))


def test_mnist_plain_file_longer_than_its_header(mnist_dir):
    p = mnist_dir / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes() + bytes(100))
    with pytest.raises(
        LwpipeError,
        match=r"t10k-labels-idx1-ubyte: header says \(7,\) \(7 bytes\) but the file "
        r"holds more after them",
    ):
        load_mnist(str(mnist_dir))


def test_made_sets_check_their_parameters_as_their_loaders():
    """blobs and textures share made_on_the_spot; each still names itself and its own bad keys."""
    from lwpipe.data import load_textures

    for load in (load_blobs, load_textures):
        with pytest.raises(TypeError, match=rf"^{load.__name__}\(\) got an unexpected keyword argument 'foo'$"):
            load(foo=1)
    with pytest.raises(ConfigError, match="needs at least 2 x num_classes = 8 samples"):
        load_blobs(n=3)
    with pytest.raises(ConfigError, match="must be at least 8"):
        load_textures(n=40, image_size=4)
    small = load_textures(n=40, image_size=8, noise=0.5)
    assert small.train.tensors[0].shape[1:] == (3, 8, 8) and len(small.test) == 8
    assert load_blobs(n=64, num_features=3).train.tensors[0].shape == (48, 3)
