"""A CIFAR-style ResNet (He et al. 2016, section 4.2) sized for a CPU.

torchvision's ResNets cannot be installed here next to torch 2.13.0 (its PyPI
wheels pin another torch), so lwpipe ships this one. It has what makes CNNs
harder to compress than LeNet: BatchNorm after every convolution and residual
additions whose two inputs must keep the same channels. `widths` sets the
channels of each stage, `blocks` the basic blocks per stage; stage i > 0
halves the resolution with a strided conv and a 1x1 projection shortcut.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1
    ):
        super().__init__()
        widths = tuple(widths)
        if not widths or min(widths) < 1 or blocks < 1:
            raise ValueError(f"widths={widths} and blocks={blocks} must be positive")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and b == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    @staticmethod
    def least_tensors(args: dict) -> int:
        """How many weight tensors these arguments build at least (two convolutions a block, the stem and
        the head), counted without building anything: model.lwp's reader checks it first."""
        widths, blocks = args.get("widths", (16, 32, 64)), args.get("blocks", 1)
        n = len(widths) if isinstance(widths, (list, tuple)) else 0
        return 2 * blocks * n + 2 if isinstance(blocks, int) and not isinstance(blocks, bool) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
