"""The constraints compression stages leave on a weight, as one torch parametrization.

Every compressible layer (Linear, Conv1d/2d/3d) gets at most one `Compressed`
parametrization on its `weight`. Its forward is

    w = centroids[index]        if shared (k-means codebook)      else original
    w = fake_quant(w)           if quantized (on the codebook when shared)
    w = where(mask, w, 0)       if masked

Later training runs *through* these constraints, so they hold by construction:
pruned weights stay exactly zero, a shared layer never has more than
len(centroids) distinct values (gradients reach the centroids grouped by
cluster, as in Deep Compression), and quantized values stay on their integer
grid (straight-through estimator).
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _RoundSTE(torch.autograd.Function):
    """Round onto the grid; pass gradients straight through inside the clip range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        unclipped = torch.round(x / scale) + zero_point
        ctx.save_for_backward((unclipped >= qmin) & (unclipped <= qmax))
        return dequantize(torch.clamp(unclipped, qmin, qmax), scale, zero_point)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The one place integer levels become floats; the artifact decoder calls this too."""
    return (q - zero_point) * scale


class Compressed(nn.Module):
    """Mask, codebook and quantization grid of one weight; each part optional."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("mask", None)
        self.register_buffer("index", None)
        self.register_parameter("centroids", None)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.bits = 0
        self.qmin = 0
        self.qmax = 0
        self.axis: int | None = None  # None: per-tensor; 0: per output channel

    # -- state -----------------------------------------------------------------
    @property
    def shared(self) -> bool:
        return self.index is not None

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def spec(self) -> dict:
        """JSON-able description of which parts exist (tensors live in the state dict)."""
        return {
            "shape": list(self.shape),
            "mask": self.mask is not None,
            "shared": self.shared,
            "k": int(self.centroids.numel()) if self.shared else 0,
            "quant": {"bits": self.bits, "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis}
            if self.quantized
            else None,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> "Compressed":
        """Empty placeholders of the right shapes, filled by load_state_dict."""
        c = cls(torch.Size(spec["shape"]))
        if spec["mask"]:
            c.mask = torch.ones(c.shape, dtype=torch.bool)
        if spec["shared"]:
            c.set_codebook(torch.zeros(c.shape, dtype=torch.long), torch.zeros(spec["k"]))
        q = spec["quant"]
        if q:
            n = 1 if q["axis"] is None else c.shape[0]
            shape = () if q["axis"] is None else (n,) + (1,) * (len(c.shape) - 1)
            c.set_quant(q["bits"], q["qmin"], q["qmax"], torch.ones(shape), torch.zeros(shape), q["axis"])
        return c

    def set_mask(self, mask: torch.Tensor) -> None:
        mask = mask.to(torch.bool)
        if self.mask is not None:
            mask = mask & self.mask  # a mask only ever shrinks
        self.mask = mask

    def set_codebook(self, index: torch.Tensor, centroids: torch.Tensor) -> None:
        self.index = index.to(torch.long)
        self.centroids = nn.Parameter(centroids.detach().clone().float())

    def set_quant(self, bits, qmin, qmax, scale, zero_point, axis) -> None:
        self.bits, self.qmin, self.qmax, self.axis = int(bits), int(qmin), int(qmax), axis
        self.scale = scale.detach().clone().float()
        self.zero_point = zero_point.detach().clone().float()

    # -- forward ---------------------------------------------------------------
    def quant_levels(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels q of x on this layer's grid (no gradient)."""
        return torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.shared:
            c = self.centroids
            if self.quantized:
                c = _RoundSTE.apply(c, self.scale, self.zero_point, self.qmin, self.qmax)
            w = c[self.index]
        else:
            w = original
            if self.quantized:
                w = _RoundSTE.apply(w, self.scale, self.zero_point, self.qmin, self.qmax)
        if self.mask is not None:
            w = torch.where(self.mask, w, torch.zeros((), dtype=w.dtype))
        return w


class HalfBias(nn.Module):
    """A bias computed through float16 (straight-through gradient), so that it stays exactly
    fp16-representable through later training and the artifact can store it in 2 bytes."""

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        rounded = bias.detach().clamp(-65504, 65504).half().to(bias.dtype)
        return rounded + (bias - bias.detach())  # value: exactly `rounded`; gradient: identity


def bias_dtype(module: nn.Module) -> torch.dtype | None:
    """The precision the layer's bias is held to: float16 under HalfBias, else its own dtype; None without bias."""
    if parametrize.is_parametrized(module, "bias"):
        if any(isinstance(p, HalfBias) for p in module.parametrizations.bias):
            return torch.float16
        return module.parametrizations.bias.original.dtype
    return module.bias.dtype if getattr(module, "bias", None) is not None else None


def set_half_bias(module: nn.Module) -> None:
    if bias_dtype(module) not in (None, torch.float16):
        parametrize.register_parametrization(module, "bias", HalfBias())


# -- helpers over a model ---------------------------------------------------------
def clone(model: nn.Module) -> nn.Module:
    """A deep copy whose parametrized modules have classes of their own.

    torch.nn.utils.parametrize gives each parametrized module a generated class and
    adds a property to it per parametrized tensor; copy.deepcopy shares that class, so
    parametrizing `bias` later on one copy would break the other (KeyError: 'bias').
    """
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return copied


def compressible_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, COMPRESSIBLE):
            yield name, m


def constraint(module: nn.Module) -> Compressed | None:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight[0]
    return None


def ensure_constraint(module: nn.Module) -> Compressed:
    """The layer's `Compressed` parametrization, attached (as identity) if missing."""
    c = constraint(module)
    if c is None:
        c = Compressed(module.weight.shape)
        parametrize.register_parametrization(module, "weight", c, unsafe=True)
    return c


def original_weight(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


@torch.no_grad()
def effective_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model computes with, by its plain state-dict name."""
    out: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in m.named_parameters(recurse=False):
            out[prefix + pname] = p.detach()
        for bname, b in m.named_buffers(recurse=False):
            if b is not None:
                out[prefix + bname] = b.detach()
        if parametrize.is_parametrized(m):
            for pname in m.parametrizations:
                out[prefix + pname] = getattr(m, pname).detach()
    # drop the parametrization internals (original, mask, index, centroids, ...)
    return {k: v for k, v in out.items() if "parametrizations." not in k}


def parameter_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Plain name -> shape of each parameter the model computes with: a parametrized tensor counts
    once (as its `original`), parametrization internals (centroids, masks) not at all."""
    out: dict[str, torch.Size] = {}
    for mname, m in model.named_modules():
        if "parametrizations" in mname.split("."):
            continue
        prefix = f"{mname}." if mname else ""
        for pname, p in m.named_parameters(recurse=False):
            out[prefix + pname] = p.shape
        if parametrize.is_parametrized(m):
            for pname in m.parametrizations:
                out[prefix + pname] = m.parametrizations[pname].original.shape
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def layer_setting(name: str, layers: Mapping[str, object], default=None):
    """Per-layer setting by exact module name, else the longest matching glob."""
    if name in layers:
        return layers[name]
    hits = [p for p in layers if fnmatch.fnmatchcase(name, p)]
    return layers[max(hits, key=len)] if hits else default


def unknown_layer_patterns(model: nn.Module, layers: Mapping[str, object]) -> list[str]:
    names = [n for n, _ in compressible_layers(model)]
    return [p for p in layers if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]


def check_layer_patterns(model: nn.Module, layers: Mapping[str, object], path: str) -> None:
    """A stage's `layers:` keys must each name or match a compressible layer."""
    bad = unknown_layer_patterns(model, layers)
    if bad:
        from lwpipe.errors import ConfigError

        names = ", ".join(n for n, _ in compressible_layers(model))
        raise ConfigError(f"{path}.layers", bad[0], f"matches no compressible layer; the layers are {names}")


@torch.no_grad()
def model_spec(model: nn.Module) -> dict[str, dict]:
    half = {"bias": "float16"}  # only present when set, so older specs read the same
    return {n: {**c.spec(), **(half if bias_dtype(m) == torch.float16 else {})}
            for n, m in compressible_layers(model) if (c := constraint(m)) is not None}


def apply_spec(model: nn.Module, spec: Mapping[str, dict]) -> None:
    """Attach empty constraints so that a saved state dict loads into `model`."""
    modules = dict(model.named_modules())
    for name, s in spec.items():
        if constraint(modules[name]) is not None:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)
        c = Compressed.from_spec(s)
        parametrize.register_parametrization(modules[name], "weight", c, unsafe=True)
        if s["shared"]:
            modules[name].parametrizations.weight.original.requires_grad_(False)
        if parametrize.is_parametrized(modules[name], "bias"):
            parametrize.remove_parametrizations(modules[name], "bias", leave_parametrized=False)
        if s.get("bias") == "float16":
            set_half_bias(modules[name])
