"""Stage `factorize`: low-rank factorization of Linear layers and 1x1 convolutions (truncated SVD,
W ~ U V), then a fine-tune.

Each chosen Linear [out, in] becomes Linear(in, r, no bias) -> Linear(r, out) (lwpipe/lowrank.py; a
1x1 conv [out, in, 1, 1] likewise two 1x1 convs)
when that has fewer parameters (r (in + out) < in out); the rank per layer is `rank`, `ratio`
of the full rank, or the fewest singular values holding `energy` of ||W||_F^2 (Denton et al. 2014,
"Exploiting Linear Structure Within Convolutional Networks for Efficient Evaluation"; Sainath et al.
2013 for fully connected layers). It changes the model's structure, so it runs before any stage that
leaves a constraint (prune, share, quantize), which then work on the factors.
"""

from __future__ import annotations

import fnmatch
import logging

import torch
from pydantic import Field, model_validator
from torch import nn

from lwpipe.constraints import constraint
from lwpipe.context import Context
from lwpipe.errors import ConfigError
from lwpipe.lowrank import dims, factorable, factorize_linear, rank_for, replace_module, saves
from lwpipe.settings import Strict, TrainSettings
from lwpipe.stages import order
from lwpipe.stages.base import Stage
from lwpipe.stages.registry import register
from lwpipe.training import finetune

log = logging.getLogger("lwpipe")


class FactorizeConfig(Strict):
    layers: list[str] = Field(["*"], min_length=1)  # Linear layers / 1x1 convs by name or glob
    rank: int | None = Field(None, ge=1, le=1 << 20)
    ratio: float | None = Field(None, gt=0, le=1)  # of the full rank min(in, out)
    energy: float | None = Field(None, gt=0, le=1)  # of the sum of squared singular values
    finetune: TrainSettings = TrainSettings()

    @model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one of rank, ratio, energy (the rank rule); got {', '.join(given) or 'none'}"
            )
        return self


FACTOR_SPARSITY = 0.5  # on digits, factors (energy 0.9) pruned to 0.5 kept accuracy; 0.7 lost 0.8, 0.9 lost 20 points


def unaddressed_factors(before, layers) -> list[str]:
    """The `layers` patterns of earlier factorize stages whose factors (`<layer>.0`, `<layer>.1`) no key of a
    later stage's per-layer `layers` settings matches: they get that stage's setting for whole layers."""
    out = []
    for s in before:
        if "lowrank" in order.leaves(s.cls):
            out += [
                p
                for p in s.config.layers
                if not any(fnmatch.fnmatchcase(f"{p}.{i}", q) for q in layers for i in (0, 1))
            ]  # `fc1` itself: gone
    return out


def warn_factor_pruning(sparsity: float | None, layers, before) -> None:
    """Pruning a factorized layer's factors at a sparsity meant for whole layers removes most of what the
    low-rank pair kept (factorize energy 0.9 then prune 0.9 took LeNet-300-100 from 97% to 77%).
    `sparsity` None: a quality or threshold rule, set for whole layers' weight distributions."""
    patterns = unaddressed_factors(before, layers)
    if patterns and (sparsity is None or sparsity > FACTOR_SPARSITY):
        setting = "its quality/threshold rule" if sparsity is None else f"sparsity={sparsity}"
        example = patterns[0] if patterns[0].endswith("*") else patterns[0] + "*"
        log.warning(
            "prune after factorize: %s, meant for whole layers, also prunes the low-rank factors of the "
            "layers %s, which already hold fewer weights and lose accuracy fast; give the factors their "
            "own setting in prune's layers (e.g. {'%s': {sparsity: %s}}) or leave prune out after "
            "factorize",
            setting,
            ", ".join(repr(p) for p in patterns),
            example,
            FACTOR_SPARSITY,
        )


def chosen(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    """The Linear layers and 1x1 convolutions the patterns name."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if n and factorable(m) and any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)
    ]


@register("factorize")
class Factorize(Stage):
    Config = FactorizeConfig
    leaves = ("lowrank",)
    _why = (
        "it replaces layers by dense factors, which would drop the mask / codebook / grid "
        "{first} left; put factorize before {names}"
    )
    refuses = {"mask": _why, "codebook": _why, "grid": _why, "resized": _why}

    @staticmethod
    def check_model(cfg: FactorizeConfig, model: nn.Module, path: str) -> None:
        layers = chosen(model, cfg.layers)
        for i, p in enumerate(cfg.layers):
            if not any(n == p or fnmatch.fnmatchcase(n, p) for n, _ in layers):
                names = ", ".join(n for n, m in model.named_modules() if n and factorable(m)) or "none"
                raise ConfigError(
                    f"{path}.layers[{i}]", p, f"matches no Linear layer or 1x1 convolution; those are {names}"
                )
        for n, m in layers:
            out_f, in_f = dims(m)
            if cfg.rank is not None and cfg.rank > min(in_f, out_f):
                raise ConfigError(
                    f"{path}.rank",
                    cfg.rank,
                    f"is larger than layer {n} [{out_f}, {in_f}] can have (at most {min(in_f, out_f)})",
                )

    def run(self, model: nn.Module, ctx: Context) -> nn.Module:
        for name, m in chosen(model, self.cfg.layers):
            if constraint(m) is not None:  # check_order keeps constraining stages after factorize
                continue
            out_f, in_f = dims(m)
            s = torch.linalg.svdvals(m.weight.detach().double().reshape(out_f, in_f))
            r = rank_for(s, self.cfg.rank, self.cfg.ratio, self.cfg.energy)
            if not saves(out_f, in_f, r):
                log.info("  factorize %s: rank %d of %d saves no parameters; kept dense", name, r, s.numel())
                continue
            kept = float((s[:r] ** 2).sum() / (s**2).sum().clamp(min=1e-300))
            replace_module(model, name, factorize_linear(m, r))
            log.info(
                "  factorize %s [%d, %d]: rank %d of %d (%.3f of the energy), %d -> %d weights",
                name,
                out_f,
                in_f,
                r,
                s.numel(),
                kept,
                m.weight.numel(),
                r * (in_f + out_f),
            )
        finetune(model, ctx, self.cfg.finetune)
        return model
