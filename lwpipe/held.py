"""Biases and norm weights held to float16 (`HalfBias`) or to an 8-bit grid (`GridBias`) through later
training, so that the artifact can store them in 2 bytes or as entropy-coded levels."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class HalfBias(nn.Module):
    """A tensor (a bias, a norm's weight) computed through float16 (straight-through gradient), so that
    it stays exactly fp16-representable through later training and the artifact can store it in 2 bytes."""

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        rounded = bias.detach().clamp(-65504, 65504).half().to(bias.dtype)
        return rounded + (bias - bias.detach())  # value: exactly `rounded`; gradient: identity


BIAS_LEVELS = 127  # `bias: int8`: levels -127..127 on one scale per tensor


class GridBias(nn.Module):
    """A bias computed as scale x an integer level in -127..127 (straight-through gradient). The scale is
    fixed when the grid is set, so later training moves the levels only and the artifact stores one scale
    and the levels, entropy-coded (~5-7 bits a bias instead of fp16's ~14)."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        rounded = torch.clamp(torch.round(bias.detach().float() / self.scale), -BIAS_LEVELS, BIAS_LEVELS) * self.scale
        return rounded.to(bias.dtype) + (bias - bias.detach())  # value: exactly `rounded`; gradient: identity


def bias_dtype(module: nn.Module) -> torch.dtype | None:
    """The precision the layer's bias is held to: float16 under HalfBias, else its own dtype; None without bias."""
    if parametrize.is_parametrized(module, "bias"):
        if any(isinstance(p, HalfBias) for p in module.parametrizations.bias):
            return torch.float16
        return module.parametrizations.bias.original.dtype
    return module.bias.dtype if getattr(module, "bias", None) is not None else None


def set_half_bias(module: nn.Module) -> None:
    set_half(module, "bias")


def set_half(module: nn.Module, attr: str) -> None:
    """Hold module.<attr> to float16 values (HalfBias); nothing when it is absent or already held."""
    if _stored(module, attr) is None or attr in half_attrs(module):
        return
    parametrize.register_parametrization(module, attr, HalfBias())


def hold_half(model: nn.Module, tensors) -> None:
    """set_half on each (module, attr) in `tensors`, and on every other module holding one of those very
    tensors (BERT's `cls.predictions.bias is cls.predictions.decoder.bias`), so a tied tensor computes
    one value everywhere."""
    wanted = {id(_stored(m, a)) for m, a in tensors} - {id(None)}
    if not wanted:
        return
    for m in model.modules():
        for a in ("weight", "bias"):
            if _stored(m, a) is not None and id(_stored(m, a)) in wanted:
                set_half(m, a)


def hold_grid(model: nn.Module, tensors) -> None:
    """Put each float32 (module, attr) in `tensors` on an 8-bit grid (GridBias, scale = max |value| / 127),
    and every other module holding that very tensor on the same one."""
    scales = {}
    for m, a in tensors:
        t = _stored(m, a)
        if t is not None and t.dtype == torch.float32 and a not in grid_attrs(m) and a not in half_attrs(m):
            top = float(getattr(m, a).detach().abs().max()) if t.numel() else 0.0
            scales[id(t)] = torch.tensor(top / BIAS_LEVELS if top > 0 else 1.0)
    if not scales:
        return
    for m in model.modules():
        for a in ("weight", "bias"):
            t = _stored(m, a)
            if t is not None and id(t) in scales and a not in grid_attrs(m):
                set_grid(m, a, scales[id(t)])


def set_grid(module: nn.Module, attr: str, scale: torch.Tensor) -> None:
    parametrize.register_parametrization(module, attr, GridBias(scale))


def grid_attrs(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors held to an 8-bit grid by GridBias: name -> scale."""
    if not parametrize.is_parametrized(module):
        return {}
    return {
        a: p.scale
        for a in sorted(module.parametrizations)
        for p in module.parametrizations[a]
        if isinstance(p, GridBias)
    }


def _stored(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The tensor module.<attr> is stored as, without computing a parametrization."""
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr, None)


def half_attrs(module: nn.Module) -> list[str]:
    """Names of the module's tensors held to float16 by HalfBias."""
    if not parametrize.is_parametrized(module):
        return []
    return sorted(
        a for a in module.parametrizations if any(isinstance(p, HalfBias) for p in module.parametrizations[a])
    )
