from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

from lwpipe.errors import ConfigError


@dataclass
class DataBundle:
    """Train and held-out test sets, and a fingerprint of their contents."""

    train: Dataset
    test: Dataset
    name: str
    identity: str = ""

    def __post_init__(self):
        if not self.identity:
            self.identity = fingerprint(self.train, self.test)


def fingerprint(*datasets: Dataset) -> str:
    """sha256 over the tensors of TensorDatasets, else over the name and length."""
    h = hashlib.sha256()
    for ds in datasets:
        if isinstance(ds, TensorDataset):
            for t in ds.tensors:
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.contiguous().numpy().tobytes())
        else:
            h.update(f"{type(ds).__qualname__}:{len(ds)}".encode())
    return h.hexdigest()[:16]


def tensor_split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    """A seeded, stratified-by-shuffle split into train and test TensorDatasets."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def made_on_the_spot(
    make, name: str, unit: str, n: int, num_classes: int, test_fraction: float, seed: int, **params
) -> DataBundle:
    """The set `load_<name>` makes on the spot (blobs, textures): `make(n, num_classes, seed, **params)` gives
    (x, y), after the checks every such set shares (its own parameters, n against the classes); the seeded
    split is tensor_split's. `unit`: what one example is called in the error ("samples", "images")."""
    unknown = sorted(set(params) - set(inspect.signature(make).parameters))
    if unknown:  # as Python words it for the loader itself
        raise TypeError(f"load_{name}() got an unexpected keyword argument {unknown[0]!r}")
    if n < 2 * num_classes:
        raise ConfigError("data.n", n, f"needs at least 2 x num_classes = {2 * num_classes} {unit}")
    x, y = make(n, num_classes, seed, **params)
    train, test = tensor_split(x, y, test_fraction, seed)
    return DataBundle(train, test, name=name)
