"""Seeded Gaussian blobs: a learnable classification task made on the spot, for tests and smoke runs."""

from __future__ import annotations

import torch

from lwpipe.data.bundle import DataBundle, tensor_split
from lwpipe.errors import ConfigError


def load_blobs(
    n: int = 512,
    num_features: int = 8,
    num_classes: int = 4,
    spread: float = 1.0,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> DataBundle:
    if n < 2 * num_classes:
        raise ConfigError("data.n", n, f"needs at least 2 x num_classes = {2 * num_classes} samples")
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, num_features, generator=g) * 2.0
    y = torch.arange(n) % num_classes
    x = centers[y] + spread * torch.randn(n, num_features, generator=g)
    train, test = tensor_split(x, y, test_fraction, seed)
    return DataBundle(train, test, name="blobs")
