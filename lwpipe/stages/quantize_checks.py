"""The quantize stage's config checks: which settings go together (run by QuantizeConfig's validator,
each raising a ValueError that names the setting, its value and what is allowed)."""

from __future__ import annotations

from lwpipe.bits_auto import auto_candidates


def check_group(cfg) -> None:
    """group_size splits a per-channel grid along the inputs: it needs per-channel scales and a grid of levels."""
    if cfg.group_size is None:
        return
    if cfg.granularity != "per_channel":
        raise ValueError(
            f"group_size={cfg.group_size} splits each output channel's scale into groups of inputs; "
            f"it needs granularity=per_channel, not {cfg.granularity}"
        )
    if cfg.step is not None or any(lc.step is not None for lc in cfg.layers.values()):
        raise ValueError(
            "group_size with step: a step grid is set by the layer's spread, not per group; drop step or group_size"
        )
    if cfg.bits == 1 or cfg.scheme == "ternary" or any(lc.bits == 1 for lc in cfg.layers.values()):
        raise ValueError(
            "group_size with binary / ternary weights: their scale is the mean |w|, per channel; "
            "drop group_size or use bits >= 2"
        )


def check_clip(cfg) -> None:
    if cfg.clip_search and (cfg.group_size is None or cfg.scheme != "symmetric"):
        raise ValueError(
            f"clip_search=true shrinks each group's symmetric scale; it needs group_size and "
            f"scheme=symmetric (here group_size={cfg.group_size}, scheme={cfg.scheme})"
        )


def check_full_range(cfg) -> None:
    """full_range widens the symmetric grid by its one extra negative level; other schemes have no such level."""
    binary = cfg.bits == 1 or any(lc.bits == 1 for lc in cfg.layers.values())
    if cfg.full_range and (cfg.scheme != "symmetric" or binary):
        raise ValueError(
            f"full_range=true uses the signed range -2^(b-1)..2^(b-1)-1 of a symmetric grid; it needs "
            f"scheme=symmetric and bits >= 2, not scheme={cfg.scheme}, bits={cfg.bits}"
        )


def check_gptq(cfg) -> None:
    """damp / block / act_order go with method: gptq; gptq needs a grid of levels to choose from."""
    if cfg.method != "gptq":
        extra = sorted({"damp", "block", "act_order", "sequential"} & cfg.model_fields_set)
        if extra:
            raise ValueError(
                f"{extra[0]} is set but method={cfg.method}: {extra[0]} is only used by method: gptq; "
                f"set method: gptq or drop {extra[0]}"
            )
        return
    binary = cfg.bits == 1 or cfg.scheme == "ternary" or any(lc.bits == 1 for lc in cfg.layers.values())
    if binary or (cfg.bits == "auto" and 1 in (cfg.candidates or ())):
        raise ValueError(
            "method=gptq with binary / ternary weights (bits=1, scheme=ternary): GPTQ chooses levels "
            "on a grid of 2 bits or more; use method: rtn, or bits >= 2"
        )


def check_binary(cfg) -> None:
    """bits=1 is sign(W) * alpha: there is no zero point for an asymmetric grid to move."""
    if cfg.scheme != "asymmetric":
        return
    bad = [("bits", 1)] * (cfg.bits == 1) + [(f"layers.{n}.bits", 1) for n, lc in cfg.layers.items() if lc.bits == 1]
    if bad:
        raise ValueError(
            f"{bad[0][0]}=1 with scheme=asymmetric: binary weights are sign(W) * alpha, symmetric "
            f"around 0 with no zero point; use scheme=symmetric (or ternary), or bits >= 2"
        )


def check_auto(cfg) -> None:
    """budget / candidates go with bits: auto and nothing else; auto needs a budget its fewest bits fit."""
    auto = cfg.bits == "auto"
    if not auto:
        extra = [k for k in ("budget", "candidates") if getattr(cfg, k) is not None]
        if extra:
            raise ValueError(
                f"{extra[0]} is set but bits={cfg.bits}: {extra[0]} is only used by bits: auto "
                f"(bits per layer by sensitivity); set bits: auto or drop {extra[0]}"
            )
        return
    if cfg.scheme == "ternary":
        raise ValueError(
            "bits=auto with scheme=ternary: ternary weights have three levels whatever the bits; "
            "use scheme=symmetric or asymmetric with bits: auto"
        )
    if cfg.budget is None:
        raise ValueError(
            "bits=auto needs a budget: budget: 3 (average bits per kept weight), "
            "budget: {bits_per_weight: 3} or budget: {bytes: N} (of the quantized weights)"
        )
    if cfg.scheme == "asymmetric" and 1 in (cfg.candidates or ()):
        raise ValueError(
            "candidates holds 1 with scheme=asymmetric: binary weights are sign(W) * alpha, with no "
            "zero point; drop 1 from candidates or use scheme=symmetric"
        )
    fewest = min(auto_candidates(cfg, shared=False))
    bpw = cfg.budget.bits_per_weight
    if bpw is not None and bpw < fewest:
        raise ValueError(
            f"budget={bpw!r} bits per weight is below what the fewest candidate bits cost "
            f"({fewest} bit{'s' * (fewest > 1)} per kept weight); allowed: at least {fewest}"
        )
