"""The stage contract: what every stage is and declares.

A stage is a class with a pydantic ``Config`` and ``run(model, ctx) -> model``, built as ``Stage(config)``.
Instead of naming other stages, it DECLARES what it does; lwpipe/stages/order.py derives every ordering
rule, the one-shot (no reference needed) detection and the calibration check from these declarations:

    leaves              what it may leave on a weight: "mask", "codebook", "grid", "lowrank", "resized"
                        (any other word is a new kind of constraint; stages that refuse it name it)
    refuses             {kind: why} constraints an earlier stage left that this stage cannot follow
    trains              whether it changes weights by training (finetune epochs > 0: `trains_with(cfg)`)
    needs_calibration   whether it reads training batches to decide (wanda, GPTQ): `needs_calibration_with`
    needs_reference     whether it reads ctx.reference (the uncompressed model: a teacher, an agreement loss)
    needs_gradients     whether it takes gradients of the task loss (taylor scores): they may need the reference
    last                whether it must be the pipeline's last stage
    writes              files it writes into the run directory (a cached replay copies them back)

A class that declares nothing (a plugin written before this contract) gets the conservative defaults below
(it trains, needs the reference, and may not be reordered: no stage that refuses a constraint may follow it)
and a warning naming what it should declare (lwpipe.registry).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel
from torch import nn

KINDS = ("mask", "codebook", "grid", "lowrank", "resized")  # the constraints the built-in stages leave
UNDECLARED = "undeclared"  # what a stage without a `leaves` declaration may leave: anything
DECLARATIONS = ("leaves", "trains", "needs_calibration", "needs_reference", "needs_gradients")


class Stage:
    """Base class of every stage; the class attributes are its declarations (see the module docstring)."""

    Config: ClassVar[type[BaseModel]]
    stage_name: ClassVar[str] = ""  # set by registry.register
    leaves: ClassVar[tuple[str, ...] | None] = None  # None: undeclared, treated as leaving anything
    refuses: ClassVar[dict[str, str]] = {}  # kind -> why ({first}: the stage that left it, {names}: all of them)
    trains: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False
    last: ClassVar[bool] = False
    writes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: BaseModel):
        self.cfg = cfg

    def run(self, model: nn.Module, ctx) -> nn.Module:
        raise NotImplementedError(f"stage {type(self).__name__} has no run(model, ctx)")

    # What depends on the settings: a subclass overrides these; the defaults read the class declarations.
    @classmethod
    def trains_with(cls, cfg) -> bool:
        return cls.trains

    @classmethod
    def needs_gradients_with(cls, cfg) -> bool:
        return cls.needs_gradients

    @classmethod
    def needs_calibration_with(cls, cfg) -> bool:
        return cls.needs_calibration

    @staticmethod
    def replayable(cfg) -> bool:
        """Whether a cache entry can stand for a run of it: False for a stage that writes more than its
        `writes` files (export's deployable forms, a folder), which is then always computed."""
        return True

    @classmethod
    def uses_reference(cls, cfg) -> bool:
        """Whether ctx.reference must exist when it runs: it reads it, or trains / takes gradients of a task
        loss that may train towards it."""
        return cls.needs_reference or cls.trains_with(cfg) or cls.needs_gradients_with(cfg)

    @classmethod
    def times_reference(cls, cfg) -> bool:
        """Whether, when latency is measured, it times ctx.reference (the uncompressed model in PyTorch) beside
        what it made; the run then keeps that copy for it (export's ONNX file does)."""
        return False

    @classmethod
    def refuses_with(cls, cfg) -> dict[str, str]:
        """`refuses` with these settings (sparsegpt, structured pruning, GPTQ refuse what they cannot follow)."""
        return cls.refuses

    # Hooks run before any work; each raises ConfigError / returns why, or does nothing.
    @staticmethod
    def check_order(cfg, before) -> str | None:
        """A settings-dependent ordering rule beyond `refuses` (`before`: earlier config.Steps); why, or None."""
        return None

    @staticmethod
    def check_model(cfg, model: nn.Module, path: str) -> None:
        """Settings that name layers name real ones (`path`: "stages.<name>")."""

    @staticmethod
    def check_context(cfg, ctx, path: str) -> None:
        """The data the stage needs exists, in a format it can use."""


def finish_declarations(cls: type) -> tuple[type, list[str]]:
    """A registered class as a Stage: a class that does not derive from Stage gets its defaults (a subclass
    of both); returns it and the declarations it left out (a plugin is warned about them)."""
    missing = [d for d in DECLARATIONS if d not in vars_of(cls)]
    if issubclass(cls, Stage):
        return cls, missing
    full = type(cls.__name__, (cls, Stage), {"__module__": cls.__module__, "__doc__": cls.__doc__})
    full.__qualname__ = cls.__qualname__
    full.plugin_class = cls
    if "compresses" in vars_of(cls) and "leaves" not in vars_of(cls):  # the older flag: compresses = False
        full.leaves = None if cls.compresses else ()
        missing.remove("leaves")
    return full, missing


def vars_of(cls: type) -> set[str]:
    """The attributes a class itself (or a base other than Stage and object) defines."""
    return {k for c in cls.__mro__ if c not in (Stage, object) for k in vars(c)}
