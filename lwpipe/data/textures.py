"""Seeded 32x32 colour texture images made on the spot: CIFAR-sized data with no download.

No PyPI package ships CIFAR-10 itself (the `cifar10*` packages download it), and
lwpipe fetches nothing, so the ResNet recipe uses this. Each class is a mix of
oriented colour gratings (its own orientations, frequencies and colour
weights); every image draws a random phase (so the pattern sits anywhere, which
pixel-wise linear models cannot exploit), a random brightness per channel and
Gaussian pixel noise. A small ResNet learns it to ~90% in a few epochs, which
leaves room to see what compression costs.
"""

from __future__ import annotations

import math

import torch

from lwpipe.data.bundle import DataBundle, made_on_the_spot
from lwpipe.errors import ConfigError


def load_textures(
    n: int = 6000, num_classes: int = 10, test_fraction: float = 0.2, seed: int = 0, **params
) -> DataBundle:
    """n images of num_classes textures; `params`: make_textures's image_size (32) and noise (1.0)."""
    if not 0 < test_fraction < 1:
        raise ConfigError("data.test_fraction", test_fraction, "must be in (0, 1)")
    return made_on_the_spot(make_textures, "textures", "images", n, num_classes, test_fraction, seed, **params)


def make_textures(n: int, num_classes: int, seed: int, image_size: int = 32, noise: float = 1.0):
    """(x, y): n images of image_size x image_size pixels, 3 channels (see the module docstring)."""
    if image_size < 8:
        raise ConfigError("data.image_size", image_size, "must be at least 8")
    g = torch.Generator().manual_seed(seed)
    waves = 3  # gratings per class
    angle = torch.rand(num_classes, waves, generator=g) * math.pi
    freq = 0.15 + 0.5 * torch.rand(num_classes, waves, generator=g)  # radians per pixel
    colour = torch.randn(num_classes, waves, 3, generator=g)
    y = torch.arange(n) % num_classes
    coords = torch.arange(image_size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S)
    a, f, c = angle[y], freq[y], colour[y]  # (n, W), (n, W), (n, W, 3)
    phase = torch.rand(n, waves, generator=g) * 2 * math.pi
    proj = torch.cos(a)[..., None, None] * xx + torch.sin(a)[..., None, None] * yy  # (n, W, S, S)
    wave = torch.sin(f[..., None, None] * proj + phase[..., None, None])
    img = torch.einsum("nwhk,nwc->nchk", wave, c) / math.sqrt(waves)
    img = img * (0.7 + 0.6 * torch.rand(n, 3, 1, 1, generator=g))
    img = img + noise * torch.randn(img.shape, generator=g)
    return img.float(), y
