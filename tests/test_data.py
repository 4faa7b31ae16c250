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
