"""One versioned schema for a compressed weight: `WeightForm` (and its `Grid`).

A layer's compressed form is everything that decides how its weight is stored and rebuilt, tensors aside:

    kind      the layer type (Linear, Conv1d/2d/3d, Embedding, transformers' Conv1D); None when read from a
              file (a file does not store it: the module it fills decides, `WeightForm.fits`)
    shape     the weight's shape;  dtype: the dtype it computes in
    mask      pruned (kept positions stored);  codebook: k-means codebook size (0: none)
    grid      bits, level bounds qmin..qmax (scheme, full_range), axis, group size (the last group's width),
              scale and zero-point shapes
    tied      other names of modules computing with this weight;  resized: the model's layers were shrunk by
              structured pruning;  lowrank: the rank when the layer is one factor of a low-rank pair, where the
              caller knows it (a file stores it only as the factors' names and shapes: lwpipe/lowrank.py)

Every rule about these fields lives here, once: the grid axis of each layer type, scale shapes, group
widths, level bounds. The quantize stage's `Compressed` builds its form (`WeightForm.of`), the encoder
writes the form's fields, the reader parses and checks the form from the header (`Grid.from_header`,
before anything is allocated) and checks the module it fills (`fits`), inspect and the deployable
writers read it. SCHEMA_VERSION counts changes of the form; the model.lwp container has its own
format version (artifact/format.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

SCHEMA_VERSION = 1
# layer kind -> (output axis, input axis): transformers' Conv1D stores its weight [in, out]; Embedding has no inputs
AXES = {
    "Linear": (0, 1),
    "Conv1d": (0, 1),
    "Conv2d": (0, 1),
    "Conv3d": (0, 1),
    "Embedding": (0, None),
    "Conv1D": (1, 0),
}
GRID_AXES = tuple(sorted({out for out, _ in AXES.values()}))  # (0, 1): every axis a grid may run along
MAX_LEVEL = 1 << 32  # |qmin|, |qmax|, an integer zero point


class FormError(ValueError):
    """A compressed form whose fields are missing, of the wrong type, out of bounds or inconsistent."""


def layer_kind(m: nn.Module) -> str | None:
    """The kind of a compressible module (a parametrized module's class is a generated subclass: the MRO)."""
    for k in type(m).__mro__:
        if k.__name__ == "Conv1D" and k.__module__.startswith("transformers"):
            return "Conv1D"
        if k.__module__.startswith("torch.nn") and k.__name__ in AXES:
            return k.__name__
    return None


def output_axis(kind: str | None) -> int:
    """The weight's axis of output channels (Embedding: tokens); 0 for a kind lwpipe does not know."""
    return AXES.get(kind, (0, 1))[0]


def input_axis(kind: str | None) -> int | None:
    return AXES.get(kind, (0, 1))[1]


def grid_axis(kind: str, per_channel: bool) -> int | None:
    """The axis a layer's grid scales run along: None per tensor, else the layer kind's output axis."""
    return output_axis(kind) if per_channel else None


def whole(value, what: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormError(f"{what} is {value!r}, not a whole number")
    if value < lo or (hi is not None and value > hi):
        raise FormError(f"{what} is {value}, outside {lo}..{hi if hi is not None else 'inf'}")
    return value


def scale_shape(shape, axis: int | None, group: int | None = None) -> tuple[int, ...]:
    """The scale's and zero point's shape for a weight of `shape`: () per tensor; per channel the output
    axis kept and 1 elsewhere; per group also one per `group` inputs (the last group may be narrower)."""
    if axis is None:
        return ()
    if group is None:
        return tuple(n if i == axis else 1 for i, n in enumerate(shape))
    return tuple(n if i == axis else -(-n // group) for i, n in enumerate(shape))


@dataclass(frozen=True)
class Grid:
    """w = (q - zero_point) x scale, q an integer in qmin..qmax; one scale per tensor (axis None), per output
    channel (axis), or per output channel and `group` consecutive inputs (2-D weights)."""

    bits: int
    qmin: int
    qmax: int
    axis: int | None = None
    group: int | None = None

    @property
    def scheme(self) -> str:
        """binary (bits=1: levels -1, +1), symmetric (restricted range), symmetric_full, asymmetric, or custom."""
        half = 1 << (self.bits - 1)
        return {
            (-1, 1): "binary" if self.bits == 1 else "symmetric",
            (1 - half, half - 1): "symmetric",
            (-half, half - 1): "symmetric_full",
            (0, 2 * half - 1): "asymmetric",
        }.get((self.qmin, self.qmax), "custom")

    @property
    def full_range(self) -> bool:
        """All 2^bits levels used (asymmetric and symmetric_full), as compressed-tensors and GGUF store them."""
        return self.qmax - self.qmin + 1 == 1 << self.bits

    @property
    def width(self) -> int:
        """Bits of one packed level (qmin .. qmax as 0 .. span)."""
        return (self.qmax - self.qmin).bit_length()

    def scale_shape(self, shape) -> tuple[int, ...]:
        return scale_shape(shape, self.axis, self.group)

    def last_group(self, shape) -> int | None:
        """The width of the last group of inputs (the others are `group` wide); None without groups."""
        if self.group is None:
            return None
        n = shape[1 - self.axis]
        return n - (-(-n // self.group) - 1) * self.group

    def expand(self, t: torch.Tensor, shape) -> torch.Tensor:
        """A scale or zero point broadcastable to the weight: per-group ones repeated over their inputs."""
        if self.group is None:
            return t
        inputs = 1 - self.axis  # groups are 2-D weights' only: the input axis is the other one
        return t.repeat_interleave(self.group, dim=inputs).narrow(inputs, 0, shape[inputs])

    def check(self, shape, what: str) -> None:
        """FormError unless bits, level bounds, axis and group fit each other and a weight of `shape`."""
        whole(self.bits, f"{what} bits", 1, 32)
        whole(self.qmin, f"{what} qmin", -MAX_LEVEL, MAX_LEVEL)
        whole(self.qmax, f"{what} qmax", -MAX_LEVEL, MAX_LEVEL)
        if self.qmin >= self.qmax:
            raise FormError(f"{what} has qmin {self.qmin} >= qmax {self.qmax}: a grid needs at least two levels")
        if self.width > max(self.bits, 2):  # bits=1: levels -1 and +1
            raise FormError(
                f"{what} has levels {self.qmin}..{self.qmax}, which need {self.width} bits; its grid has {self.bits}"
            )
        axis = self.axis
        if axis is not None and (type(axis) is not int or axis not in GRID_AXES or axis >= len(shape)):
            raise FormError(
                f"{what} axis is {axis!r}: a grid is per tensor (null) or along the weight's "
                f"output axis ({' or '.join(map(str, GRID_AXES))}, within its {len(shape)} dimensions)"
            )
        if self.group is not None:
            if axis is None or len(shape) != 2:
                raise FormError(
                    f"{what} has per-group scales (group {self.group!r}) without a per-channel grid on a 2-D weight"
                )
            whole(self.group, f"{what} group", 1, shape[1 - axis])

    def check_shapes(self, shapes: dict[str, list], shape, what: str) -> None:
        """FormError unless each of {"scale": ..., "zp": ...} has the shape this grid gives a `shape` weight."""
        want = list(self.scale_shape(shape))
        for part, have in shapes.items():
            if list(have) != want:  # a scale broadcast to any other shape would change the weight's shape
                kind = "per-tensor" if self.axis is None else f"axis-{self.axis}"
                raise FormError(
                    f"{what} {part} has shape {list(have)}; a {kind} grid of a {list(shape)} weight has {want}"
                )

    def check_values(self, scale: torch.Tensor, zp: torch.Tensor, name: str) -> None:
        """Every level is a finite weight: scales positive and finite, (qmin - zp) x scale, (qmax - zp) x scale
        finite, so no NaN, Inf, 0 or overflowing scale loads."""
        if not bool((scale > 0).all() & torch.isfinite(scale).all()):  # NaN > 0 is False
            bad = scale[~((scale > 0) & torch.isfinite(scale))].reshape(-1)[0]
            raise FormError(f"layer {name!r}: a grid scale is {float(bad)}, not a positive finite number")
        ends = torch.stack(torch.broadcast_tensors(*((float(q) - zp) * scale for q in (self.qmin, self.qmax))))
        if not bool(torch.isfinite(ends).all()):
            raise FormError(
                f"layer {name!r}: its grid's levels {self.qmin}..{self.qmax} (scale up to {float(scale.max())}, "
                f"zero point {float(zp.reshape(-1)[0]) if zp.numel() else 0}) give non-finite weights"
            )

    def header(self, scale: list, zp: list) -> dict:
        """The layer's "quant" header entry, in the file's key order; scale / zp: [how, shape] as stored."""
        out = {"bits": self.bits, "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis, "scale": scale}
        if self.group is not None:
            out["group"] = self.group
        out["zp"] = zp
        return out

    @classmethod
    def from_header(cls, q: dict, shape, what: str) -> Grid:
        """The grid a "quant" header entry declares, checked against the weight's shape (its scale and zero
        point shapes too); the stored tensors' descriptions are the reader's (artifact/limits.py)."""
        if not isinstance(q, dict):
            raise FormError(f"{what} is {type(q).__name__}, not an object")
        grid = cls(q.get("bits"), q.get("qmin"), q.get("qmax"), q.get("axis"), q.get("group"))
        grid.check(shape, what)
        for part in ("scale", "zp"):
            pair = q.get(part)
            if not isinstance(pair, list):
                raise FormError(f"{what} {part} is {type(pair).__name__}, not a list")
            if len(pair) != 2:
                raise FormError(f"{what} {part} is {pair!r}, not [how, shape]")
        return grid

    def spec(self) -> dict:
        """The checkpoint spec's "quant" entry (lwpipe/constraints.model_spec)."""
        out = {"bits": self.bits, "qmin": self.qmin, "qmax": self.qmax, "axis": self.axis}
        return out | ({"group": self.group} if self.group is not None else {})


@dataclass(frozen=True)
class WeightForm:
    """One layer's compressed form (see the module docstring); built from a constraint when writing, parsed
    and checked from the header when reading."""

    name: str
    kind: str | None
    shape: tuple[int, ...]
    dtype: str
    mask: bool = False
    codebook: int = 0
    grid: Grid | None = None
    tied: tuple[str, ...] = ()
    lowrank: int | None = None
    resized: bool = False
    version: int = field(default=SCHEMA_VERSION)

    @property
    def codebook_levels(self) -> bool:
        """A codebook stored as integer levels: one grid for the whole codebook (per tensor)."""
        return bool(self.codebook) and self.grid is not None and self.grid.axis is None

    @classmethod
    def of(cls, name: str, module: nn.Module, c, tied=(), resized: bool = False) -> WeightForm:
        """The form of `module`'s constraint `c` (lwpipe.compressed.Compressed), checked."""
        from lwpipe.artifact.raw import dtype_name

        held = parametrize.is_parametrized(module, "weight")
        stored = module.parametrizations.weight.original if held else module.weight
        form = cls(
            name=name,
            kind=layer_kind(module),
            shape=tuple(c.shape),
            dtype=dtype_name(stored.dtype),
            mask=c.mask is not None or c.zeros_deferred,  # deferred zeros: stored as the mask they make
            codebook=int(c.centroids.numel()) if c.shared else 0,
            grid=c.form_grid,
            tied=tuple(tied),
            lowrank=None,
            resized=resized,
        )
        form.check()
        if form.grid is not None:  # the tensors the constraint holds have the form's shapes
            shapes = {"scale": list(c.scale.shape), "zp": list(c.zero_point.shape)}
            form.grid.check_shapes(shapes, form.shape, f"layer {name!r} grid")
        return form

    @classmethod
    def from_header(cls, e: dict, header: dict) -> WeightForm:
        """The form a layer entry of a model.lwp header declares (artifact/limits.check_header has checked its
        fields); the layer kind is the module's it fills (`fits`)."""
        q = e.get("quant")
        tied = header.get("tied") or {}
        return cls(
            name=e["name"],
            kind=None,
            shape=tuple(e["shape"]),
            dtype=e["dtype"],
            mask=e.get("mask") is not None,
            codebook=int(e["shared"]["k"]) if e.get("shared") is not None else 0,
            grid=None if q is None else Grid(q["bits"], q["qmin"], q["qmax"], q["axis"], q.get("group")),
            tied=tuple(a for a, n in tied.items() if n == e["name"]),
            resized=header.get("resized") is True,
        )

    def check(self) -> None:
        """FormError unless the grid fits the weight and the layer kind (when known)."""
        if self.grid is None:
            return
        axis, out = self.grid.axis, output_axis(self.kind)
        if self.kind is not None and axis is not None and axis != out:  # the reader takes no other axis
            raise FormError(
                f"layer {self.name}: its grid runs along axis {axis}, not along its output axis {out}; "
                "the artifact cannot store it"
            )
        self.grid.check(self.shape, f"layer {self.name!r} grid")

    def fits(self, kind: str | None, module_name: str | None = None) -> None:
        """FormError unless a per-channel grid runs along the output axis of the layer kind it fills."""
        if kind is None or self.grid is None or self.grid.axis is None or self.grid.axis == output_axis(kind):
            return
        raise FormError(
            f"{self.name} has a grid along axis {self.grid.axis}, but its layer, a {module_name or kind}, "
            f"has its output channels on axis {output_axis(kind)}"
        )

    def check_tensors(self, scale: torch.Tensor, zp: torch.Tensor) -> None:
        """FormError unless the grid's scale and zero point have its shapes and give finite weights."""
        shapes = {"scale": list(scale.shape), "zp": list(zp.shape)}
        self.grid.check_shapes(shapes, self.shape, f"layer {self.name!r} grid")
        self.grid.check_values(scale, zp, self.name)
