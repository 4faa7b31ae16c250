"""The config base every stage's settings derive from, and the training settings stages share. Kept apart from
lwpipe/config.py (the whole recipe, which looks stages up in the registry) so that stages import their base
without importing the recipe's validation, and no import cycle runs core -> stages -> core."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base for every config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class LayerSettings(Strict):
    """One layer's own settings in a stage's `layers:` (by module name or glob): a field left None takes the
    stage's setting; `skip`: the stage leaves the layer alone."""

    skip: bool = False


class LayerPrune(LayerSettings):
    sparsity: float | None = Field(None, ge=0, lt=1)
    quality: float | None = Field(None, gt=0, le=100)  # threshold = quality x std(W)


class LayerShare(LayerSettings):
    bits: int | None = Field(None, ge=1, le=16)


class LayerQuant(LayerSettings):
    bits: int | None = Field(None, ge=1, le=16)
    step: float | None = Field(None, gt=0, le=10)
    frequency_prior: float | None = Field(None, gt=0, le=1e9)  # token table: a step per row by use (frequency.py)


class TrainSettings(Strict):
    """Supervised training; used by `train`, by every stage's `finetune`, and by `distill`."""

    epochs: int = Field(0, ge=0, le=100_000)
    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    batch_size: int | None = Field(None, ge=1, le=1 << 20)


class CalibrationSettings(Strict):
    """One-shot methods' calibration data (quantize method: gptq, prune criterion: sparsegpt): `samples` texts
    or examples of data.train, each at most `seq_len` tokens; `sequential`: block by block (lwpipe/blockwise.py),
    the blocks being `blocks` (a ModuleList's qualified name, "model.layers") or found by structure."""

    samples: int = Field(128, ge=1, le=1_000_000)
    seq_len: int = Field(512, ge=1, le=1 << 20)
    blocks: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.]+$")
    sequential: bool = True
