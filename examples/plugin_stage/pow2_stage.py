"""A third-party lwpipe stage: every weight of the chosen layers becomes a power of two (or zero).

Powers of two turn multiplications into shifts, a constraint no built-in stage leaves ("pow2"). The stage
declares what it leaves and what it cannot follow; lwpipe derives the ordering checks from that. Its one
registration line is the entry point in pyproject.toml:

    [project.entry-points."lwpipe.stages"]
    pow2 = "pow2_stage:PowersOfTwo"
"""

from __future__ import annotations

import fnmatch

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lwpipe.stages.base import Stage


class PowersOfTwoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is refused, naming the key
    layers: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of Linear layers")
    min_exponent: int = Field(-12, le=0, description="weights below 2**min_exponent in size become zero")


class PowersOfTwo(Stage):
    Config = PowersOfTwoConfig
    leaves = ("pow2",)  # a new kind of constraint
    refuses = {  # rounding to powers of two would move weights off what these stages left
        "codebook": "pow2 would move the weights off the codebook {first} left; put pow2 before {names}",
        "grid": "pow2 would move the weights off the integer grid {first} left; put pow2 before {names}",
    }
    trains = False  # one shot: it rounds, it does not fine-tune
    needs_reference = False  # so a pipeline of one-shot stages keeps no copy of the uncompressed model

    def run(self, model: nn.Module, ctx) -> nn.Module:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in self.cfg.layers):
                with torch.no_grad():
                    m.weight.copy_(powers_of_two(m.weight, self.cfg.min_exponent))
        return model


def powers_of_two(w: torch.Tensor, min_exponent: int) -> torch.Tensor:
    """The nearest power of two (in log scale) with w's sign; 0 below 2**min_exponent."""
    exponent = torch.round(torch.log2(w.abs().clamp_min(2.0**min_exponent)))
    return torch.where(w.abs() < 2.0**min_exponent, torch.zeros_like(w), torch.sign(w) * 2.0**exponent)
