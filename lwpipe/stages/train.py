"""Stage `train`: training with the task's loss (ctx.task), seeded."""

from __future__ import annotations

from pydantic import Field

from lwpipe.context import Context
from lwpipe.settings import TrainSettings
from lwpipe.stages.base import Stage
from lwpipe.stages.registry import register
from lwpipe.training import finetune


class TrainConfig(TrainSettings):
    epochs: int = Field(10, ge=0, le=100_000)


@register("train")
class Train(Stage):
    Config = TrainConfig
    leaves = ()
    trains = True
    needs_reference = False  # trains with the task's loss: Stage.uses_reference counts that

    def run(self, model, ctx: Context):
        return finetune(model, ctx, self.cfg)
