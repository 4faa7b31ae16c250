"""scikit-learn's bundled 8x8 digits (1,797 images): the default data, no download."""
from __future__ import annotations

import torch

from lwpipe.data.bundle import DataBundle, tensor_split
from lwpipe.errors import ConfigError


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    if not 0 < test_fraction < 1:
        raise ConfigError("data.test_fraction", test_fraction, "must be in (0, 1)")
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    train, test = tensor_split(x, y, test_fraction, split_seed)
    return DataBundle(train, test, name="digits")
