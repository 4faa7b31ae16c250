"""The plugin's own test: run `pytest` in this folder once the package is installed (pip install -e .)."""

import torch
from pow2_stage import powers_of_two


def test_weights_become_signed_powers_of_two_or_zero():
    w = torch.tensor([0.3, -0.7, 1e-6, 0.0, 5.0])
    got = powers_of_two(w, min_exponent=-12)
    assert got.tolist() == [0.25, -0.5, 0.0, 0.0, 4.0]
    exponents = torch.log2(got[got != 0].abs())
    assert torch.equal(exponents, exponents.round())
