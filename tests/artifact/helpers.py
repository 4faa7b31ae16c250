"""Constrained layers built directly with constraints.ensure_constraint, one per encoding the artifact has."""

from __future__ import annotations

import torch
from torch import nn

from lwpipe.constraints import ensure_constraint, set_half_bias
from lwpipe.models import TinyMLP

CONFIG = {"_target_": "lwpipe.models.TinyMLP", "in_features": 32, "hidden": 64, "num_classes": 8, "checkpoint": None}


def tiny() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(in_features=32, hidden=64, num_classes=8).eval()


def magnitude_mask(w: torch.Tensor, keep: float) -> torch.Tensor:
    return w.abs() >= w.abs().flatten().quantile(1 - keep)


def codebook(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    centroids = torch.linspace(w.min().item(), w.max().item(), k)
    return (w.unsqueeze(-1) - centroids).abs().argmin(-1), centroids


def grid(x: torch.Tensor, bits: int, symmetric: bool, per_channel: bool):
    """(qmin, qmax, scale, zero_point, axis) covering x."""
    dims = tuple(range(1, x.dim()))
    lo = x.amin(dims, keepdim=True) if per_channel else x.min()
    hi = x.amax(dims, keepdim=True) if per_channel else x.max()
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(-lo, hi) / qmax
        return -qmax, qmax, scale, torch.zeros_like(scale), 0 if per_channel else None
    scale = (hi - lo) / (2**bits - 1)
    return 0, 2**bits - 1, scale, torch.round(-lo / scale), 0 if per_channel else None


@torch.no_grad()
def constrain(layer: nn.Module, kind: str) -> None:
    """kind: '+'-joined parts among pruned, shared, quant, quant_asym, quant_channel, half_bias."""
    parts = set(kind.split("+"))
    c = ensure_constraint(layer)  # 'identity' when no part is named
    w = layer.weight.detach()
    if "pruned" in parts:
        c.set_mask(magnitude_mask(w, 0.3))
    if "shared" in parts:
        c.set_codebook(*codebook(w, 16))
    quant = [p for p in parts if p.startswith("quant")]
    if quant:
        values = c.centroids.detach() if c.shared else w
        qmin, qmax, scale, zp, axis = grid(
            values, 8 if c.shared else 5, quant[0] != "quant_asym", quant[0] == "quant_channel"
        )
        c.set_quant(8 if c.shared else 5, qmin, qmax, scale, zp, axis)
    if "half_bias" in parts:
        set_half_bias(layer)


def model_with(first: str, second: str = "pruned") -> TinyMLP:
    m = tiny()
    if first != "untouched":
        constrain(m[1], first)
    if second != "untouched":
        constrain(m[3], second)
    return m


class SmallConv(nn.Module):
    """Conv2d -> Linear, for the 4-d weight path (built by tests with module=)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))
