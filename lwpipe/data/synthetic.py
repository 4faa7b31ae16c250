"""Seeded Gaussian blobs: a learnable classification task made on the spot, for tests and smoke runs."""

from __future__ import annotations

import torch

from lwpipe.data.bundle import DataBundle, made_on_the_spot


def load_blobs(n: int = 512, num_classes: int = 4, test_fraction: float = 0.25, seed: int = 0, **params) -> DataBundle:
    """n samples of num_classes Gaussian blobs; `params`: make_blobs's num_features (8) and spread (1.0)."""
    return made_on_the_spot(make_blobs, "blobs", "samples", n, num_classes, test_fraction, seed, **params)


def make_blobs(n: int, num_classes: int, seed: int, num_features: int = 8, spread: float = 1.0):
    """(x, y): each class a blob of the given spread around a random centre in num_features dimensions."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, num_features, generator=g) * 2.0
    y = torch.arange(n) % num_classes
    x = centers[y] + spread * torch.randn(n, num_features, generator=g)
    return x, y
