"""MNIST from the standard IDX files in a local folder (nothing is downloaded)."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lwpipe.data.bundle import DataBundle
from lwpipe.errors import ConfigError, LwpipeError

FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
EXPECTED = "the MNIST IDX files " + ", ".join(f"{f}[.gz]" for f in FILES.values())


GZIP_MAX_RATIO = 1100  # deflate expands at most ~1032x: a .gz cannot hold more than this times its size


def _header(f, path: Path, ndim_expected: int | None) -> tuple[int, ...]:
    magic = f.read(4)
    if len(magic) < 4 or magic[0:2] != b"\x00\x00" or magic[2] != 0x08:
        raise LwpipeError(
            f"{path}: not an unsigned-byte IDX file (bad magic {magic.hex()}, expected 00000801 "
            f"for labels or 00000803 for images)"
        )
    ndim = magic[3]
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise LwpipeError(
            f"{path}: truncated header: {4 + len(raw)} bytes, but its magic announces {ndim} "
            f"dimensions, so the header takes {4 + 4 * ndim} bytes"
        )
    if ndim_expected is not None and ndim != ndim_expected:
        kind = "labels (1 dimension)" if ndim_expected == 1 else f"images ({ndim_expected} dimensions)"
        raise LwpipeError(f"{path}: holds a {ndim}-dimensional array, expected {kind}; are the files swapped?")
    return struct.unpack(f">{ndim}I", raw)


def _body(f, path: Path, dims: tuple[int, ...], gz: bool) -> bytes:
    """The declared number of bytes, read while streaming: a file (or a .gz decompressing to) more or less
    than the header declares is refused before anything beyond the declared size is held."""
    size, stored = math.prod(dims), path.stat().st_size
    if gz and size > GZIP_MAX_RATIO * stored:
        raise LwpipeError(
            f"{path}: header says {dims} ({size:,} bytes), more than a {stored:,}-byte gzip file can hold"
        )
    if not gz and stored != 4 + 4 * len(dims) + size:
        raise LwpipeError(
            f"{path}: header says {dims} but holds {stored - 4 - 4 * len(dims)} bytes (truncated?)"
            if stored < 4 + 4 * len(dims) + size
            else f"{path}: header says {dims} ({size:,} bytes) but the file holds more after them"
        )
    data = f.read(size)
    if len(data) < size:
        raise LwpipeError(f"{path}: header says {dims} but holds {len(data)} bytes (truncated?)")
    if f.read(1):
        raise LwpipeError(
            f"{path}: decompresses to more than the {size:,} bytes its header {dims} declares "
            f"(a damaged or hostile file); stopped reading there"
        )
    return data


def read_idx(path: Path, ndim_expected: int | None = None) -> np.ndarray:
    gz = path.suffix == ".gz"
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            dims = _header(f, path, ndim_expected)
            data = _body(f, path, dims, gz)
    except (OSError, EOFError, zlib.error) as e:  # a cut-off or corrupt .gz too
        raise LwpipeError(f"{path}: cannot be read: {e}") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise ConfigError("data.root", str(root), f"{stem}[.gz] not found there; expected {EXPECTED}")


def load_mnist(root: str | None = None, limit_train: int | None = None) -> DataBundle:
    if root is None:
        raise ConfigError("data.root", None, f"required: a folder holding {EXPECTED}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError("data.root", str(root), f"directory does not exist; expected a folder holding {EXPECTED}")
    files = {k: _find(path, stem) for k, stem in FILES.items()}
    arrays = {k: read_idx(f, 3 if k.endswith("_x") else 1) for k, f in files.items()}
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise LwpipeError(
            f"{files['test_x']}: images of {arrays['test_x'].shape[1:]} pixels, but the training "
            f"images in {files['train_x']} are {arrays['train_x'].shape[1:]}"
        )
    for k in ("train_y", "test_y"):
        if arrays[k].size == 0:
            raise LwpipeError(f"{files[k]}: holds no labels; both splits need samples")
        if arrays[k].max() > 9:  # MNIST's classes are the digits
            at = int(np.argmax(arrays[k] > 9))
            raise LwpipeError(f"{files[k]}: label {int(arrays[k][at])} at sample {at}; MNIST labels are 0..9")

    def tensors(x, y):
        if len(x) != len(y):
            raise LwpipeError(f"MNIST in {path}: {len(x)} images but {len(y)} labels")
        return torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 255.0, torch.tensor(y, dtype=torch.long)

    tx, ty = tensors(arrays["train_x"], arrays["train_y"])
    if limit_train:
        tx, ty = tx[:limit_train], ty[:limit_train]
    return DataBundle(TensorDataset(tx, ty), TensorDataset(*tensors(arrays["test_x"], arrays["test_y"])), name="mnist")
