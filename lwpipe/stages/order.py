"""Every ordering rule, derived from the stages' declarations (lwpipe/stages/base.py) in one place.

    check(steps, pipeline)   before any work: `last` stages are last; no stage follows a constraint it
                             `refuses`; then each stage's own settings-dependent `check_order`
    needs_reference(steps, timing)  whether any of `steps` may use ctx.reference, or time it (else a run keeps
                             one copy fewer)
    compresses(cls)          whether a stage leaves a constraint (the reference is the model before the first)
    leaving(before, *kinds)  the earlier steps that may leave one of `kinds` (an undeclared stage: any)

No rule here names a stage: a plugin that declares the same gets the same checks.
"""

from __future__ import annotations

from lwpipe.errors import ConfigError
from lwpipe.stages.base import UNDECLARED, Stage


def leaves(cls) -> tuple[str, ...]:
    declared = getattr(cls, "leaves", None)
    return (UNDECLARED,) if declared is None else tuple(declared)


def compresses(cls) -> bool:
    """Whether the stage leaves a constraint on the weights (a stage that declares nothing: it may)."""
    return bool(leaves(cls))


def leaving(before, *kinds: str) -> list:
    """The earlier steps that may leave one of `kinds`; a stage that declares nothing may leave any."""
    return [s for s in before if any(k in kinds or k == UNDECLARED for k in leaves(s.cls))]


def refusal(step, before) -> str | None:
    """Why `step` cannot follow `before`: the first reason it gives for a kind an earlier stage may leave
    (kinds refused for one reason are one rule: {names} lists every earlier stage that leaves any of them)."""
    refuses = step.cls.refuses_with(step.config)
    for why in dict.fromkeys(refuses.values()):
        kinds = [k for k, w in refuses.items() if w == why]
        done = [s.name for s in leaving(before, *kinds)]
        if done:
            return why.format(first=done[0], names=", ".join(done))
    return None


def check(steps, pipeline: list) -> None:
    """ConfigError for the first step that cannot stand where it is, naming pipeline[i]."""
    for i, step in enumerate(steps):
        if step.cls.last and i != len(steps) - 1:
            raise ConfigError(f"pipeline[{i}]", step.name, f"must be the last stage; {pipeline[i + 1 :]} follow it")
        why = refusal(step, steps[:i]) or step.cls.check_order(step.config, steps[:i])
        if why:
            raise ConfigError(f"pipeline[{i}]", step.name, f"cannot follow {pipeline[:i]}: {why}")


def one_shot(step) -> bool:
    """A stage that neither trains nor reads the reference nor takes task-loss gradients with these settings."""
    return not step.cls.uses_reference(step.config)


def needs_reference(steps, timing: bool = True) -> bool:
    """Whether a stage among `steps` may use ctx.reference (a teacher, or a task loss that trains towards
    it), or times it when `timing` (measure.latency). One-shot stages do not: without the copy a large
    model's run keeps one copy fewer."""
    return not all(one_shot(s) for s in steps) or (timing and any(s.cls.times_reference(s.config) for s in steps))


def check_before_work(steps, model, ctx) -> None:
    """Settings that name layers name real ones, and each stage's data is there, before any stage runs."""
    for s in steps:
        s.cls.check_model(s.config, model, f"stages.{s.name}")
        s.cls.check_context(s.config, ctx, f"stages.{s.name}")  # a stage's own check names its key
        if s.cls.check_context is Stage.check_context and s.cls.needs_calibration_with(s.config):
            if not has_batches(ctx):
                raise ConfigError(
                    f"pipeline[{steps.index(s)}]",
                    s.name,
                    "needs calibration data (training batches), and the training set gives no batch; give data.train",
                )


def has_batches(ctx) -> bool:
    train = getattr(getattr(ctx, "data", None), "train", None)
    return train is not None and (not hasattr(train, "__len__") or len(train) > 0)
