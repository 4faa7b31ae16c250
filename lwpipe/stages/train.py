"""Stage `train`: training with the task's loss (ctx.task), seeded."""

from __future__ import annotations

from pydantic import Field

from lwpipe.context import Context
from lwpipe.registry import register
from lwpipe.settings import TrainSettings
from lwpipe.training import fit


class TrainConfig(TrainSettings):
    epochs: int = Field(10, ge=0, le=100_000)


@register("train")
class Train:
    Config = TrainConfig
    compresses = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def run(self, model, ctx: Context):
        return fit(
            model, ctx.train_loader(self.cfg.batch_size), self.cfg, loss_fn=ctx.loss, on_epoch=ctx.epoch_callback(model)
        )
