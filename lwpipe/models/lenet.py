"""The Deep Compression benchmark networks, with a configurable input size."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LeNet300(nn.Module):
    """LeNet-300-100: fully connected, in_features -> 300 -> 100 -> num_classes."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: tuple[int, int] = (300, 100)):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (20 and 50 5x5 conv filters, fc 500) as used in Deep Compression.

    `padding=None` picks 0 for 28x28 inputs (the original) and 2 for small
    inputs such as 8x8 digits, so the two conv+pool blocks still fit.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, padding: int | None = None):
        super().__init__()
        pad = (0 if image_size >= 16 else 2) if padding is None else padding
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=pad)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=pad)
        side = image_size
        for _ in range(2):
            side = (side + 2 * pad - 4) // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} with padding={pad} is too small for LeNet-5")
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))
