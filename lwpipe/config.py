"""Validate a composed recipe before any model or data is built.

`validate(cfg)` turns Hydra's DictConfig into a `Recipe`: the top-level
settings checked by pydantic, and the pipeline resolved to
(name, stage class, stage config) triples. Every problem becomes a
`ConfigError` naming the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, Field, ValidationError, field_validator

from lwpipe import compute
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.settings import CalibrationSettings, Strict, TrainSettings  # noqa: F401  (re-exported)
from lwpipe.stages import registry
from lwpipe.tasks import TASK_METRICS


class EvalSettings(Strict):
    batch_size: int = Field(512, ge=1, le=1 << 20)


class CacheSettings(Strict):
    """The stage cache (lwpipe/cache.py); `cache=false` turns it off."""

    enabled: bool = True
    dir: str = Field("outputs/cache", min_length=1)
    max_bytes: int | None = Field(None, ge=1)  # after a store, least recently used entries go beyond this
    wait_seconds: float = Field(86400.0, gt=0)  # how long a job waits for a stage another job is computing


class TaskSettings(Strict):
    """What the model computes: the batch format, loss, metric and distillation target (lwpipe/tasks)."""

    name: Literal["classification", "text_classification", "causal_lm", "embedding"] = "classification"


class MeasureSettings(Strict):
    """Compute cost in every baseline / stage_end record (lwpipe/speed.py)."""

    latency: bool = True  # false: no timing (fast tests)
    batch: int | None = Field(None, ge=1, le=1 << 16)  # the larger batch timed besides 1; None: 256 or the test set
    repeats: int = Field(30, ge=1, le=100_000)  # timed forwards per batch size (median)
    warmup: int = Field(3, ge=0, le=10_000)  # untimed forwards first
    max_seconds: float = Field(2.0, gt=0, le=3600)  # per batch size: fewer repeats for slow models
    threads: int = Field(0, ge=0, le=1024)  # CPU threads while timing; 0: torch's setting


# what the entry point returns, for sweepers that optimise it (one value, or a tuple of them);
# `quality` is the task's headline metric (accuracy, perplexity or cosine)
Objective = Literal[
    "accuracy",
    "loss",
    "teacher_agreement",
    "sparsity",
    "compression_ratio",
    "compressed_bytes",
    "quality",
    "perplexity",
    "cosine",
]


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # model.dtype: what the model is loaded and kept in
DTYPE_BUILDERS = ("lwpipe.models.hf.load_hf", "lwpipe.models.sentence.load_sentence_transformer")


class TopLevel(Strict):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a folder name under outputs/runs
    seed: int = Field(0, ge=0, le=2**32 - 1)
    pipeline: list[str]
    stages: dict[str, dict[str, Any]] = {}
    model: dict[str, Any]
    data: dict[str, Any]
    logger: dict[str, dict[str, Any] | None] = {}
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int = Field(0, ge=0, le=1024)  # torch intra-op threads; 0: the launcher's share (lwpipe/jobs.py)
    task: TaskSettings = TaskSettings()
    eval: EvalSettings = EvalSettings()
    artifact: bool = True
    quiet: bool = False  # the console logger's switch (recipes/logger/default.yaml)
    measure: MeasureSettings = MeasureSettings()
    cache: CacheSettings = CacheSettings()  # `cache=false` is short for cache.enabled=false
    calibration: CalibrationSettings = CalibrationSettings()  # one-shot methods' data, given to their stages
    objective: list[Objective] = Field(["accuracy"], min_length=1, max_length=6)

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_switch(cls, value):
        if isinstance(value, bool):
            return {"enabled": value}
        if not isinstance(value, dict):
            raise ValueError("use cache=true or cache=false, or set cache.enabled and cache.dir")
        return value


@dataclass
class Step:
    name: str  # the name in `pipeline` (and key under `stages`)
    type: str  # the registered plugin it uses
    cls: type
    config: BaseModel


@dataclass
class Recipe:
    top: TopLevel
    steps: list[Step]
    raw: dict  # the resolved recipe, as saved next to the run


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds: itself, inside Optional/Union, or as a dict's values / a list's items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = get_args(annotation)
    if get_origin(annotation) is dict:
        args = args[1:]
    elif get_origin(annotation) not in (Union, list, None) and type(annotation).__name__ != "UnionType":
        return None
    return next((m for m in map(_model_in, args) if m is not None), None)


def keys_at(cls: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys allowed at `loc` inside `cls` (a path of field names, dict keys and list indexes)."""
    for part in loc:
        if cls is None:
            return []
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a dict key or list index: the model is the same one level down
        cls = _model_in(field.annotation)
    return list(cls.model_fields) if cls is not None else []


def unknown_key(path: str, loc: tuple, value, cls: type[BaseModel] | None) -> str:
    """'unknown key' with the nearest allowed key, as unknown stage names get the nearest stage."""
    keys = keys_at(cls, tuple(loc[:-1]))
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6) if loc else []
    hint = f"did you mean {close[0]!r}?" if close else "check its spelling"
    known = f" (the keys there: {', '.join(keys)})" if keys else ""
    return f"{path}: unknown key (value {value!r}); {hint}{known}"


def _format(prefix: str, err: ValidationError, cls: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        path = ".".join([prefix] + [str(x) for x in e["loc"]]) if prefix else ".".join(str(x) for x in e["loc"])
        value = e.get("input")
        if e["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(unknown_key(path, e["loc"], value, cls))
        elif not e["loc"] or isinstance(value, dict):  # a check across several keys: the message names them
            lines.append(f"{path or 'recipe'}: {e['msg'].removeprefix('Value error, ')}")
        elif isinstance(value, float) and value != value:  # NaN fails every bound; say what it is
            lines.append(f"{path}=nan: not a number; {e['msg'].removeprefix('Value error, ').lower()}")
        else:
            lines.append(f"{path}={value!r}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _check(cls: type[BaseModel], data: Any, prefix: str) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise LwpipeError(_format(prefix, e, cls)) from None


def _stage_config(name: str, settings: dict | None) -> Step:
    settings = dict(settings or {})
    type_ = settings.pop("type", name)
    cls = registry.get(type_)
    if cls is None:
        if type_ != name:
            raise ConfigError(f"stages.{name}.type", type_, f"no stage plugin of that name; {registry.suggest(type_)}")
        raise ConfigError(
            f"stages.{name}",
            name,
            f"no stage plugin named {name!r}; set stages.{name}.type to one of them ({registry.suggest(name)})",
        )
    return Step(name, type_, cls, _check(cls.Config, settings, f"stages.{name}"))


def _missing(raw, prefix: str = ""):
    """Paths of mandatory values (`???`) nobody set, e.g. model.path of model=hf."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            yield from _missing(v, f"{prefix}{k}.")
    elif raw == "???":
        yield prefix.rstrip(".")


def validate(cfg: DictConfig | dict) -> Recipe:
    try:
        raw = (
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            if isinstance(cfg, DictConfig)
            else dict(cfg)
        )
    except Exception as e:  # an interpolation that does not resolve
        raise LwpipeError(f"recipe does not resolve: {e}") from None
    raw.pop("hydra", None)
    for path in _missing(raw):
        raise ConfigError(path, "???", "required: set it on the command line, e.g. model.path=DIR")
    top = _check(TopLevel, raw, "")
    headline = TASK_METRICS[top.task.name]
    for i, name in enumerate(top.objective):  # causal_lm also records next-token accuracy
        if name in TASK_METRICS.values() and name != headline and (name, top.task.name) != ("accuracy", "causal_lm"):
            raise ConfigError(
                f"objective[{i}]",
                name,
                f"task {top.task.name} does not record it; its metric is {headline} (or use quality)",
            )
    for key in ("model", "data"):
        if "_target_" not in getattr(top, key):
            raise ConfigError(f"{key}._target_", None, f"required: the import path of the {key} builder")
    if top.model.get("_target_") in DTYPE_BUILDERS and top.model.get("dtype", "auto") not in MODEL_DTYPES:
        raise ConfigError(
            "model.dtype", top.model["dtype"], f"allowed: {', '.join(MODEL_DTYPES)} (auto: the checkpoint's own)"
        )
    compute.check(top.model.get("compute_dtype", "auto"))

    # every stage entry must resolve, even those not in the pipeline: a typo is a typo
    steps_by_name = {name: _stage_config(name, s) for name, s in top.stages.items()}
    steps = []
    for i, name in enumerate(top.pipeline):
        if name in steps_by_name:
            steps.append(steps_by_name[name])
        elif registry.get(name) is not None:
            steps.append(_stage_config(name, {}))
        else:
            raise ConfigError(
                f"pipeline[{i}]",
                name,
                f"no settings under stages.{name} and no stage plugin of that name; {registry.suggest(name)}",
            )
    for step in {id(s): s for s in [*steps, *steps_by_name.values()]}.values():
        with_calibration(step, top.calibration)
    check_context(top, [s for s in steps if calibrates(s)])
    from lwpipe.stages import order  # the stages import this module

    order.check(steps, list(top.pipeline))
    return Recipe(top=top, steps=steps, raw=raw)


def calibrates(step: Step) -> bool:
    """The step uses calibration data through the top-level `calibration` settings (GPTQ, SparseGPT)."""
    cfg = step.config
    return "calibration" in type(cfg).model_fields and (
        getattr(cfg, "method", None) == "gptq" or getattr(cfg, "criterion", None) == "sparsegpt"
    )


def with_calibration(step: Step, calibration: CalibrationSettings) -> None:
    """Give a stage that takes `calibration` the top-level settings. The stage's own older keys, where the
    recipe sets them, still win: quantize's `calibration_samples` (samples) and `sequential`."""
    cfg = step.config
    if not calibrates(step):  # other methods' settings (and so their cache keys) stay as they were
        return
    own = {"samples": "calibration_samples", "sequential": "sequential"}
    merged = calibration.model_copy(
        update={new: getattr(cfg, old) for new, old in own.items() if old in cfg.model_fields_set}
    )
    step.config = cfg.model_copy(update={"calibration": merged})


def check_context(top: TopLevel, steps: list[Step]) -> None:
    """Calibration sequences longer than the model's context (its config.json's max_position_embeddings) are
    refused before anything is built: the sequences are min(calibration.seq_len, data.max_length) tokens."""
    if not steps or top.model.get("_target_") not in DTYPE_BUILDERS or not top.model.get("path"):
        return
    from lwpipe.models.hf import context_length

    context = context_length(top.model["path"])
    longest = min(top.calibration.seq_len, top.data.get("max_length") or top.calibration.seq_len)
    if context is not None and longest > context:
        raise ConfigError(
            "calibration.seq_len",
            top.calibration.seq_len,
            f"calibration sequences of {longest} tokens (min of calibration.seq_len and data.max_length="
            f"{top.data.get('max_length')}) are longer than the model's context of {context} tokens; "
            f"set calibration.seq_len and data.max_length to at most {context}",
        )
