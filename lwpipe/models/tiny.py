"""A tiny MLP for smoke tests and unit tests: Linear(8,16) -> ReLU -> Linear(16,4)."""

from __future__ import annotations

from torch import nn


class TinyMLP(nn.Sequential):
    def __init__(self, in_features: int = 8, hidden: int = 16, num_classes: int = 4):
        super().__init__(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
