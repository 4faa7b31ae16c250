"""The constraints compression stages leave on a weight, as one torch parametrization.

Every compressible layer (Linear, Conv1d/2d/3d, Embedding, transformers' GPT-2
`Conv1D`) gets at most one `Compressed` parametrization on its `weight`. Its forward is

    w = centroids[index]        if shared (k-means codebook)      else original
    w = fake_quant(w)           if quantized (on the codebook when shared)
    w = where(mask, w, 0)       if masked

Later training runs *through* these constraints, so they hold by construction:
pruned weights stay exactly zero, a shared layer never has more than
len(centroids) distinct values (gradients reach the centroids grouped by
cluster, as in Deep Compression), and quantized values stay on their integer
grid (straight-through estimator).

Layouts differ: Linear, Conv and Embedding keep output channels (Embedding: tokens)
on axis 0, transformers' Conv1D stores its weight transposed, [in, out], so its
output channels are axis 1 (`out_axis`, `in_axis`). Modules that compute with one
shared weight (GPT-2's `lm_head.weight is transformer.wte.weight`) are one layer:
`compressible_layers` yields the first of them, and the same `Compressed` instance
is registered on all of them (`ensure_constraint(module, tied)`), so they compute
with one constrained weight and the artifact stores it once.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2), found by name so that lwpipe never imports transformers for it
    (through the MRO: a parametrized module's class is a generated subclass)."""
    return any(k.__name__ == "Conv1D" and k.__module__.startswith("transformers") for k in type(m).__mro__)


def is_compressible(m: nn.Module) -> bool:
    return isinstance(m, COMPRESSIBLE) or is_hf_conv1d(m)


def out_axis(m: nn.Module) -> int:
    """The weight's axis of output channels (Embedding: tokens); per-channel grids and structured pruning use it."""
    return 1 if is_hf_conv1d(m) else 0


def in_axis(m: nn.Module) -> int | None:
    """The weight's axis of input channels; None for Embedding, which has no input activation."""
    if isinstance(m, nn.Embedding):
        return None
    return 0 if is_hf_conv1d(m) else 1


def index_dtype(k: int) -> torch.dtype:
    """The narrowest dtype for codebook indices 0..k-1 (uint8 indexes as a mask, so it is widened in forward)."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 1 << 15 else torch.int32


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


class _SignSTE(torch.autograd.Function):
    """Binary weights (bits=1, XNOR-Net): sign(x) * scale; gradients pass straight through where
    |x| <= 1.5 scale (the grid's range plus half a step, as _RoundSTE's clip range)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x.abs() <= 1.5 * scale)
        return dequantize(torch.sign(x), scale, torch.zeros((), dtype=scale.dtype))

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


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
        self.axis: int | None = None  # None: per-tensor; else the weight's axis of output channels
        self.group: int | None = None  # per-group: one scale per output channel and `group` consecutive inputs

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
            | ({"group": self.group} if self.group is not None else {})
            if self.quantized
            else None,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> Compressed:
        """Empty placeholders of the right shapes, filled by load_state_dict."""
        c = cls(torch.Size(spec["shape"]))
        if spec["mask"]:
            c.mask = torch.ones(c.shape, dtype=torch.bool)
        if spec["shared"]:
            c.set_codebook(torch.zeros(c.shape, dtype=index_dtype(spec["k"])), torch.zeros(spec["k"]))
        q = spec["quant"]
        if q:
            shape = scale_shape(c.shape, q["axis"], q.get("group"))
            c.set_quant(
                q["bits"], q["qmin"], q["qmax"], torch.ones(shape), torch.zeros(shape), q["axis"], q.get("group")
            )
        return c

    def set_mask(self, mask: torch.Tensor) -> None:
        mask = mask.to(torch.bool)
        if self.mask is not None:
            mask = mask & self.mask  # a mask only ever shrinks
        self.mask = mask

    def set_codebook(self, index: torch.Tensor, centroids: torch.Tensor) -> None:
        self.index = index.to(index_dtype(centroids.numel()))
        self.centroids = nn.Parameter(centroids.detach().clone().float())

    def set_quant(self, bits, qmin, qmax, scale, zero_point, axis, group: int | None = None) -> None:
        self.bits, self.qmin, self.qmax, self.axis, self.group = int(bits), int(qmin), int(qmax), axis, group
        self.scale = scale.detach().clone().float()
        self.zero_point = zero_point.detach().clone().float()

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) broadcastable to the weight: per-group ones repeated over their inputs."""
        if self.group is None:
            return self.scale, self.zero_point
        inputs = 1 - self.axis  # groups are 2-D weights' only: the input axis is the other one
        n = self.shape[inputs]
        return tuple(
            t.repeat_interleave(self.group, dim=inputs).narrow(inputs, 0, n) for t in (self.scale, self.zero_point)
        )

    @torch.no_grad()
    def codebook_values(self) -> torch.Tensor:
        """The values the codebook entries take in forward (on the grid when quantized)."""
        c = self.centroids.detach()
        return dequantize(self.quant_levels(c), self.scale, self.zero_point) if self.quantized else c

    # -- forward ---------------------------------------------------------------
    def quant_levels(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels q of x on this layer's grid (no gradient); bits=1: the sign, levels -1 / +1."""
        if self.bits == 1:
            return torch.sign(x)
        scale, zero_point = self.grid()
        return torch.clamp(torch.round(x / scale) + zero_point, self.qmin, self.qmax)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:  # binary: the sign, not the nearest level (0 is not a level; pruned zeros are masked)
            return _SignSTE.apply(x, self.scale)
        return _RoundSTE.apply(x, *self.grid(), self.qmin, self.qmax)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.shared:
            c = self.centroids
            if self.quantized:
                c = self.fake_quant(c)
            w = c[self.index.int()]  # int32 indexes like int64 at half the memory
        else:
            w = original
            if self.quantized:
                w = self.fake_quant(w)
        if self.mask is not None:
            w = torch.where(self.mask, w, torch.zeros((), dtype=w.dtype))
        return w.to(original.dtype)  # grids and codebooks are float32: a bf16 / fp16 layer computes in its dtype


def grid_shape(shape, axis: int, group: int | None = None) -> tuple[int, ...]:
    """Shape of a per-channel scale along `axis` of a weight of `shape`; with `group` (2-D weights), also one
    per `group` consecutive inputs along the other axis (the last group may be shorter)."""
    if group is not None:
        return tuple(n if i == axis else -(-n // group) for i, n in enumerate(shape))
    return tuple(n if i == axis else 1 for i, n in enumerate(shape))


GRID_AXES = (0, 1)  # the output axes of the layouts lwpipe knows: out_axis of every compressible layer type


def grid_axis(module: nn.Module, per_channel: bool) -> int | None:
    """The axis a layer's grid scales run along: None per tensor, else the layer type's output axis
    (out_axis: 1 for transformers' Conv1D). The quantize stage, the encoder, the decoder and the int8
    export all ask this one function, so a grid the writer stores is one the reader accepts."""
    return out_axis(module) if per_channel else None


def scale_shape(shape, axis: int | None, group: int | None = None) -> tuple[int, ...]:
    """The shape of a grid's scale and zero point for a weight of `shape`: () per tensor."""
    return () if axis is None else grid_shape(shape, axis, group)


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
    """Each compressible weight once: of modules sharing one weight (tied), the first in module order."""
    seen = set()
    for name, m in model.named_modules():
        if is_compressible(m) and id(original_weight(m)) not in seen:
            seen.add(id(original_weight(m)))
            yield name, m


def tied_layers(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Layer name (as compressible_layers gives it) -> the other modules computing with its weight."""
    owner, out = {}, {}
    for name, m in model.named_modules():
        if is_compressible(m):
            first = owner.setdefault(id(original_weight(m)), name)
            if first != name:
                out.setdefault(first, []).append((name, m))
    return out


def constraint(module: nn.Module) -> Compressed | None:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight[0]
    return None


def ensure_constraint(module: nn.Module, tied=()) -> Compressed:
    """The layer's `Compressed` parametrization, attached (as identity) if missing; the same instance
    on every module in `tied` ((name, module) pairs from tied_layers) that shares the weight."""
    c = constraint(module)
    if c is None:
        c = Compressed(module.weight.shape)
        parametrize.register_parametrization(module, "weight", c, unsafe=True)
    for _, m in tied:
        if constraint(m) is not c:
            parametrize.register_parametrization(m, "weight", c, unsafe=True)
    return c


@torch.no_grad()
def release_original(module: nn.Module) -> None:
    """A shared layer computes from its codebook only: its frozen original weight is replaced by one
    broadcast zero of the same shape, so the dense copy's memory is freed (Deep Compression keeps no
    dense weights after sharing either). A state dict still has the tensor, as zeros."""
    w = original_weight(module)
    w.requires_grad_(False)
    w.data = torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)


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
    once (as its `original`), a tied one once (under its first name), parametrization internals
    (centroids, masks) not at all."""
    return {name: t.shape for name, t in plain_parameters(model).items()}


def plain_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain name -> the stored parameter (a parametrized one's `original`), each tensor once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, m in model.named_modules():
        if "parametrizations" in mname.split("."):
            continue
        prefix = f"{mname}." if mname else ""
        found = list(m.named_parameters(recurse=False))
        if parametrize.is_parametrized(m):
            found += [(pname, m.parametrizations[pname].original) for pname in m.parametrizations]
        for pname, p in found:
            if id(p) not in seen:
                seen.add(id(p))
                out[prefix + pname] = p
    return out


def tensor_aliases(model: nn.Module) -> dict[str, str]:
    """Plain name -> the first plain name of the same stored tensor, for tensors held under several names
    (tied weights)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for mname, m in model.named_modules():
        if "parametrizations" in mname.split("."):
            continue
        prefix = f"{mname}." if mname else ""
        found = list(m.named_parameters(recurse=False)) + [
            (n, b) for n, b in m.named_buffers(recurse=False) if b is not None
        ]
        if parametrize.is_parametrized(m):
            found += [(pname, m.parametrizations[pname].original) for pname in m.parametrizations]
        for pname, p in found:
            name = first.setdefault(id(p), prefix + pname)
            if name != prefix + pname:
                out[prefix + pname] = name
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def layer_setting(name: str, layers: Mapping[str, object], default=None, also=()):
    """Per-layer setting by exact module name, else the longest matching glob. `also`: other names of
    the same layer (modules tied to it), so that `lm_head` finds GPT-2's tied `transformer.wte`."""
    names = [name, *also]
    for n in names:
        if n in layers:
            return layers[n]
    hits = [p for p in layers if any(fnmatch.fnmatchcase(n, p) for n in names)]
    return layers[max(hits, key=len)] if hits else default


def unknown_layer_patterns(model: nn.Module, layers: Mapping[str, object]) -> list[str]:
    names = [n for n, m in model.named_modules() if is_compressible(m)]
    return [p for p in layers if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]


def check_layer_patterns(model: nn.Module, layers: Mapping[str, object], path: str) -> None:
    """A stage's `layers:` keys must each name or match a compressible layer."""
    bad = unknown_layer_patterns(model, layers)
    if bad:
        from lwpipe.errors import ConfigError

        names = [n for n, m in model.named_modules() if is_compressible(m)]
        names = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        raise ConfigError(f"{path}.layers", bad[0], f"matches no compressible layer; the layers are {names}")


@torch.no_grad()
def model_spec(model: nn.Module) -> dict[str, dict]:
    """JSON-able constraint layout: per layer its Compressed spec (+ "tied": the other modules sharing it),
    per module with float16-held tensors "half": their names."""
    ties = tied_layers(model)
    out = {}
    for n, m in model.named_modules():
        entry = {}
        if is_compressible(m) and (c := constraint(m)) is not None and n not in _tied_names(ties):
            entry.update(c.spec())
            if n in ties:
                entry["tied"] = [t for t, _ in ties[n]]
        if half := half_attrs(m):
            entry["half"] = half
        if grid := grid_attrs(m):
            entry["grid"] = list(grid)  # the scales are buffers: the state dict carries them
        if entry:
            out[n] = entry
    return out


def _tied_names(ties: dict) -> set[str]:
    return {t for group in ties.values() for t, _ in group}


def apply_spec(model: nn.Module, spec: Mapping[str, dict]) -> None:
    """Attach empty constraints so that a saved state dict loads into `model`."""
    modules = dict(model.named_modules())
    for name, s in spec.items():
        m = modules[name]
        for attr in [a for a in list(m.parametrizations) if a != "weight"] if parametrize.is_parametrized(m) else []:
            parametrize.remove_parametrizations(m, attr, leave_parametrized=False)
        if "shape" in s:
            tied = [(t, modules[t]) for t in s.get("tied", [])]
            for _, t in [(name, m)] + tied:
                if constraint(t) is not None:
                    parametrize.remove_parametrizations(t, "weight", leave_parametrized=False)
            for _, t in tied:  # the saved model computed both with one weight: so does this one
                if t.weight is not m.weight:
                    del t.weight
                    t.weight = m.weight
            c = Compressed.from_spec(s)
            ensure_constraint_as(m, c, tied)
            if s["shared"]:
                m.parametrizations.weight.original.requires_grad_(False)
        for attr in s.get("half", ["bias"] if s.get("bias") == "float16" else []):  # "bias": older specs
            set_half(m, attr)
        for attr in s.get("grid", []):
            set_grid(m, attr, torch.ones(()))


def ensure_constraint_as(module: nn.Module, c: Compressed, tied=()) -> None:
    """Register `c` on module and every tied module (the same instance)."""
    for m in [module] + [t for _, t in tied]:
        parametrize.register_parametrization(m, "weight", c, unsafe=True)


def kept_kinds(model: nn.Module, kinds: list[str]) -> set[str]:
    """Names of the compressible layers `keep` leaves alone: Embedding tables, and the output head
    (transformers' get_output_embeddings(); tied to the token table in GPT-2, so one layer)."""
    head = model.get_output_embeddings() if "output_head" in kinds and hasattr(model, "get_output_embeddings") else None
    out = set()
    ties = tied_layers(model)
    for name, m in compressible_layers(model):
        group = [m] + [t for _, t in ties.get(name, ())]
        if ("embeddings" in kinds and isinstance(m, nn.Embedding)) or (
            head is not None and any(x is head for x in group)
        ):
            out.add(name)
    return out
