"""Stage `distill`: knowledge-distillation fine-tune (Hinton et al. 2015).

    loss = task.distill_loss(student outputs, teacher outputs)
           + beta * sum over `features` of MSE(student activation, teacher activation)

What the student matches is the task's (lwpipe/tasks): for classification and
text_classification Hinton's (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T));
for causal_lm the same per next-token position; for embedding 1 - cos(e_s, e_t).

Dynamic weighting: `alpha` (the lambda of L(W) + lambda * L(T(W))) and `temperature` are
each a number or a schedule over the stage's epochs, e.g. `alpha: {schedule: linear,
start: 0.9, end: 0.3}` (constant, linear, or cosine from start to end); every epoch record
carries the `alpha` and `temperature` that epoch trained with.

The teacher is the model as it was before the first compression stage
(default), the model after an earlier stage (`teacher: <stage name>`), or a
weights file (`teacher: path/to/file.safetensors`), loaded into a copy of that
reference model. It runs in eval mode without gradients. The student trains
through every constraint it carries, so masks, codebooks and grids hold.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from lwpipe import checkpoint
from lwpipe.constraints import clone
from lwpipe.context import Context
from lwpipe.errors import ConfigError
from lwpipe.settings import Strict, TrainSettings
from lwpipe.stages import order
from lwpipe.stages.base import Stage
from lwpipe.stages.registry import register
from lwpipe.tasks.classification import Classification, kd_loss  # noqa: F401  (kd_loss: the public name)
from lwpipe.training import Hooks, finetune

log = logging.getLogger("lwpipe")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
WORSE_BY = 0.05  # relative: a teacher this much below the student teaches it to be worse


class Schedule(Strict):
    """A value over a stage's epochs: `start` throughout (constant), or start -> end, linear or cosine."""

    schedule: Literal["constant", "linear", "cosine"]
    start: float = Field(ge=0, le=100)
    end: float | None = Field(None, ge=0, le=100)

    @model_validator(mode="after")
    def _ends(self):
        if self.schedule != "constant" and self.end is None:
            raise ValueError(f"schedule={self.schedule} goes from start to end: set end")
        if self.schedule == "constant" and self.end not in (None, self.start):
            raise ValueError(
                f"schedule=constant holds start={self.start}; end={self.end} would be ignored: "
                f"leave end out, or use linear or cosine"
            )
        return self

    def at(self, epoch: int, epochs: int) -> float:
        """The value for epoch 1..epochs: start at the first epoch, end at the last."""
        if self.schedule == "constant" or epochs <= 1:
            return self.start
        p = (epoch - 1) / (epochs - 1)
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * p
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * p)) / 2


def scheduled(value: float | Schedule, epoch: int, epochs: int) -> float:
    return value.at(epoch, epochs) if isinstance(value, Schedule) else float(value)


BOUNDS = {"alpha": (0.0, 1.0, "within [0, 1]"), "temperature": (0.0, 100.0, "above 0 and at most 100")}


class DistillConfig(TrainSettings):
    epochs: int = Field(5, ge=0, le=100_000)
    temperature: float | Schedule = 4.0
    alpha: float | Schedule = 0.7  # weight of the soft (teacher) loss: the lambda
    teacher: str | None = Field(None, min_length=1)  # None: the pre-compression model; or a stage name / a path
    features: list[str] = []  # module names whose activations the student matches
    feature_weight: float = Field(1.0, ge=0, le=1e6)

    @field_validator("alpha", "temperature", mode="before")
    @classmethod
    def _number_or_schedule(cls, value, info):
        lo, hi, allowed = BOUNDS[info.field_name]
        if isinstance(value, dict):
            try:
                value = Schedule.model_validate(value)
            except ValidationError as e:
                err = e.errors()[0]
                key = ".".join(str(x) for x in err["loc"])
                where = f"{key}={err['input']!r}: " if key else ""
                raise ValueError(
                    f"{where}{err['msg'].removeprefix('Value error, ')} "
                    f"(a schedule is {{schedule: constant|linear|cosine, start, end}})"
                ) from None
            ends = [("start", value.start)] + [("end", value.end)] * (value.end is not None)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            ends = [("", float(value))]
        else:
            return value  # the type check names it
        for key, v in ends:
            if not (v == v and lo <= v <= hi and (info.field_name != "temperature" or v > 0)):
                raise ValueError(f"{key}={v!r} must be {allowed}" if key else f"must be {allowed}")
        return value


def is_path(teacher: str) -> bool:
    return teacher.endswith(WEIGHT_SUFFIXES) or "/" in teacher


class _Activations:
    """Forward hooks that keep the latest output of each named module."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(module, args, output):
            self.out[name] = output[0] if isinstance(output, tuple) else output  # transformers blocks: tuples

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def trainer(step) -> bool:
    """A stage that trains and leaves no constraint (train, distill)."""
    return not order.compresses(step.cls) and step.cls.trains_with(step.config)


def untrained_teacher(before) -> str | None:
    """The default teacher is the model before the first compression stage; when a `train` stage only comes
    after that, the teacher is the input before training (pipeline=[prune,train,distill])."""
    first = next((i for i, s in enumerate(before) if order.compresses(s.cls)), None)
    if first is None or any(trainer(s) for s in before[:first]):
        return None
    trains = [s.name for s in before[first + 1 :] if trainer(s)]
    if not trains:
        return None
    return (
        f"distill's teacher (teacher: null) is the model before {before[first].name}, the first compression "
        f"stage: the input model, untrained until {trains[0]} runs after {before[first].name}; put "
        f"{trains[0]} before {before[first].name}, or give distill a trained teacher (a weights file)"
    )


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(pa[k].shape == pb[k].shape and torch.equal(pa[k], pb[k]) for k in pa)


def check_teacher(teacher: nn.Module, student: nn.Module, ctx: Context) -> None:
    """Warn when distill would teach nothing or teach worse: the teacher is the student itself (distill
    before any stage changed the model), or it scores clearly below the student on the held-out data."""
    if same_weights(teacher, student):
        log.warning(
            "distill: the teacher is the model distill starts from (no stage changed it before "
            "distill), so it teaches nothing beyond the task loss; put distill after the compression "
            "stages"
        )
        return
    task, batches = ctx.task, ctx.test_loader()
    if task.metric == "cosine":  # measured against the teacher itself: no score of its own
        return
    tq, sq = (task.evaluate(m, batches)[0]["quality"] for m in (teacher, student))
    worse = tq < sq * (1 - WORSE_BY) if task.higher_is_better else tq > sq * (1 + WORSE_BY)
    if worse:
        log.warning(
            "distill: the teacher scores %s %.4g, below the student's %.4g: it would teach the student "
            "to be worse (is it the untrained input? set distill's teacher to a trained stage or "
            "weights file, or train before compressing)",
            task.metric,
            tq,
            sq,
        )


def epoch_weights(cfg: DistillConfig, epoch: int) -> dict[str, float]:
    """The alpha and temperature epoch `epoch` (1-based) of cfg.epochs trains with."""
    return {
        "alpha": scheduled(cfg.alpha, epoch, cfg.epochs),
        "temperature": scheduled(cfg.temperature, epoch, cfg.epochs),
    }


def distill_loss_fn(
    teacher: nn.Module,
    cfg: DistillConfig,
    s_acts: _Activations | None,
    t_acts: _Activations | None,
    task=None,
    now: dict[str, float] | None = None,
):
    """`now`: the current epoch's {"alpha", "temperature"}, a dict the caller updates between epochs
    (None: the first epoch's)."""
    task = task or Classification()
    now = now if now is not None else epoch_weights(cfg, 1)

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        with torch.no_grad():
            t_out = task.forward(teacher, batch)
        loss = task.distill_loss(task.forward(model, batch), t_out, batch, now["temperature"], now["alpha"])
        if s_acts is not None and cfg.feature_weight > 0:
            loss = loss + cfg.feature_weight * sum(
                F.mse_loss(s_acts.out[n], t_acts.out[n].detach()) for n in cfg.features
            )
        return loss

    return loss_fn


@register("distill")
class Distill(Stage):
    Config = DistillConfig
    leaves = ()  # it adds no constraint; the reference stays the pre-compression model
    needs_reference = True  # the default teacher

    @staticmethod
    def check_order(cfg: DistillConfig, before) -> str | None:
        why = untrained_teacher(before) if cfg.teacher is None else None
        if why:
            log.warning("%s", why)
        if cfg.teacher is None or is_path(cfg.teacher):
            return None
        if cfg.teacher not in [s.name for s in before]:
            earlier = ", ".join(s.name for s in before) or "none"
            return (
                f"teacher={cfg.teacher!r} is not an earlier stage (earlier: {earlier}); name an earlier stage, "
                f"a weights file ({', '.join(WEIGHT_SUFFIXES)}), or leave it null for the pre-compression model"
            )
        return None

    @staticmethod
    def check_model(cfg: DistillConfig, model: nn.Module, path: str) -> None:
        names = dict(model.named_modules())
        for i, n in enumerate(cfg.features):
            if not n or n not in names:
                known = ", ".join(k for k in names if k)
                raise ConfigError(f"{path}.features[{i}]", n, f"no module of that name; the modules are {known}")
        if cfg.teacher and is_path(cfg.teacher):  # read it now, not after the stages before distill
            checkpoint.load_weights(clone(model), cfg.teacher, key=f"{path}.teacher")

    def teacher(self, ctx: Context, path: str) -> nn.Module:
        t = self.cfg.teacher
        if t is None:
            teacher = ctx.reference
        elif is_path(t):
            teacher = checkpoint.load_weights(clone(ctx.reference), t, key=f"{path}.teacher")
        else:
            teacher = ctx.snapshots[t]
        teacher = teacher.to(ctx.device).eval()
        teacher.requires_grad_(False)
        return teacher

    def epoch_hook(self, ctx: Context, model: nn.Module, now: dict[str, float]):
        """After each epoch: its record gets the alpha and temperature it trained with, then `now` moves on."""
        report = ctx.hooks(model, fields=lambda: dict(now))

        def hook(epoch: int, loss: float) -> None:
            if report.on_epoch is not None:
                report.on_epoch(epoch, loss)
            now.update(epoch_weights(self.cfg, epoch + 1))

        return Hooks(hook, report.on_batch)

    def run(self, model: nn.Module, ctx: Context) -> nn.Module:
        teacher = self.teacher(ctx, f"stages.{ctx.stage}")
        check_teacher(teacher, model, ctx)
        s_acts = _Activations(model, self.cfg.features) if self.cfg.features else None
        t_acts = _Activations(teacher, self.cfg.features) if self.cfg.features else None
        try:
            now = epoch_weights(self.cfg, 1)
            loss_fn = distill_loss_fn(teacher, self.cfg, s_acts, t_acts, ctx.task, now)
            finetune(model, ctx, self.cfg, loss_fn=loss_fn, hooks=self.epoch_hook(ctx, model, now))
        finally:
            for acts in (s_acts, t_acts):
                if acts is not None:
                    acts.remove()
        return model
