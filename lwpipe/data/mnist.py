"""MNIST from the standard IDX files in a local folder (nothing is downloaded)."""
from __future__ import annotations

import gzip
import struct
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


def read_idx(path: Path, ndim_expected: int | None = None) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a cut-off .gz too
        raise LwpipeError(f"{path}: cannot be read: {e}") from None
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise LwpipeError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()}, expected 00000801 "
                          f"for labels or 00000803 for images)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise LwpipeError(f"{path}: truncated header: {len(raw)} bytes, but its magic announces {ndim} dimensions, "
                          f"so the header takes {4 + 4 * ndim} bytes")
    if ndim_expected is not None and ndim != ndim_expected:
        kind = "labels (1 dimension)" if ndim_expected == 1 else f"images ({ndim_expected} dimensions)"
        raise LwpipeError(f"{path}: holds a {ndim}-dimensional array, expected {kind}; are the files swapped?")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise LwpipeError(f"{path}: header says {dims} but holds {data.size} bytes (truncated?)")
    return data.reshape(dims)


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
        raise LwpipeError(f"{files['test_x']}: images of {arrays['test_x'].shape[1:]} pixels, but the training "
                          f"images in {files['train_x']} are {arrays['train_x'].shape[1:]}")
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
