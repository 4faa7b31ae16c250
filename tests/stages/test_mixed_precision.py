"""quantize.bits: auto: bits per layer from the Fisher-weighted quantization error, under a budget."""

import itertools
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import lwpipe
from lwpipe.artifact import encode_model
from lwpipe.config import validate
from lwpipe.constraints import clone, compressible_layers, constraint
from lwpipe.context import Context
from lwpipe.data import load_blobs
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.mixed_precision import allot, quantization_error, sensitivities
from lwpipe.stages.prune import Prune, PruneConfig
from lwpipe.stages.quantize import Quantize, QuantizeConfig, kept_count, quantize_any
from tests.helpers import TINY, compose_recipe, run_recipe

CONFIG = {"_target_": "lwpipe.models.TinyMLP"}


def auto(model, ctx, **kw):
    ctx.stage_record = {}
    Quantize(QuantizeConfig(bits="auto", **kw)).run(model, ctx)
    return ctx.stage_record


@pytest.mark.parametrize("budget", [1.5, 2.5, 3, 4.2])
def test_allotment_respects_an_average_bits_budget(model, ctx, budget):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)
    kept = {n: kept_count(m) for n, m in compressible_layers(model)}
    rec = auto(model, ctx, budget=budget)
    bits = {n: constraint(m).bits for n, m in compressible_layers(model)}
    assert bits == rec["bits_allotted"]  # what was logged is what was applied
    assert sum(bits[n] * k for n, k in kept.items()) <= budget * sum(kept.values())
    assert rec["avg_bits_per_weight"] == pytest.approx(sum(bits[n] * k for n, k in kept.items()) / sum(kept.values()))


def test_allotment_respects_a_bytes_budget_and_counts_fixed_layers(model, ctx):
    kept = {n: kept_count(m) for n, m in compressible_layers(model)}  # 128 and 64 weights, nothing pruned
    rec = auto(model, ctx, budget={"bytes": 100}, layers={"3": {"bits": 4}})
    assert rec["bits_allotted"]["3"] == 4  # fixed, and counted: 64 x 4 = 256 bits leave 544 for 128 weights
    assert rec["bits_allotted"]["1"] == 4 and constraint(model[1]).bits == 4  # 5 bits would need 640
    assert sum(rec["bits_allotted"][n] * k for n, k in kept.items()) <= 800
    assert rec["quantized_weight_bytes"] <= 100


def test_large_budget_gives_every_layer_the_most_bits(model, ctx):
    rec = auto(model, ctx, budget=16)
    assert set(rec["bits_allotted"].values()) == {8}
    assert all(constraint(m).bits == 8 for _, m in compressible_layers(model))
    rec = auto(clone(model), ctx, budget={"bits_per_weight": 16}, candidates=[2, 3, 12])
    assert set(rec["bits_allotted"].values()) == {12}


def test_allot_is_the_exact_optimum(tmp_path):
    rng = np.random.default_rng(0)
    for _trial in range(30):
        kept = rng.integers(1, 40, size=4).tolist()
        bits = [1, 2, 3, 4, 6, 8]
        omega = [{b: float(rng.random() * 2.0**-b) for b in bits} for _ in kept]
        budget = float(rng.integers(sum(kept), 8 * sum(kept)))
        best = min(
            (sum(o[b] for o, b in zip(omega, c)), c)
            for c in itertools.product(bits, repeat=4)
            if sum(b * n for b, n in zip(c, kept)) <= budget
        )
        got = allot(omega, kept, budget)
        assert sum(b * n for b, n in zip(got, kept)) <= budget
        assert sum(o[b] for o, b in zip(omega, got)) == pytest.approx(best[0], rel=1e-12)
    assert allot([{2: 1.0, 3: 0.5}], [10], 19) is None  # 2 bits x 10 weights do not fit in 19


def test_allot_in_coarse_units_still_holds_the_budget():
    kept = [300_001, 200_003, 99_999]
    omega = [{b: s * 2.0**-b for b in (1, 2, 3, 4, 8)} for s in (1.0, 5.0, 0.3)]
    budget = 3 * sum(kept)  # 1.8 M bits: counted in units of 7 bits, each layer's cost rounded up

    def best(limit):
        return min(
            sum(o[b] for o, b in zip(omega, c))
            for c in itertools.product((1, 2, 3, 4, 8), repeat=3)
            if sum(b * n for b, n in zip(c, kept)) <= limit
        )

    got = allot(omega, kept, budget)
    assert sum(b * n for b, n in zip(got, kept)) <= budget
    assert best(budget) <= sum(o[b] for o, b in zip(omega, got)) <= best(budget - 3 * 7)  # a unit a layer at most


class Twin(nn.Module):
    """Two Linear layers with the same weights, side by side; the loss weighs the first `scale` times more."""

    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.scale = nn.Linear(16, 16), nn.Linear(16, 16), scale
        self.b.load_state_dict(self.a.state_dict())

    def loss(self, _model, batch):
        x, target = batch
        return (self.scale * (self.a(x) - target).pow(2).sum() + (self.b(x) - target).pow(2).sum()) / 2


@pytest.mark.parametrize("diagonal", [False, True])
def test_more_sensitive_layer_of_the_same_size_gets_at_least_as_many_bits(diagonal):
    twin = Twin(scale=5.0)
    torch.manual_seed(1)
    batches = [(torch.randn(1, 16), torch.randn(1, 16)) for _ in range(32)]
    cfg = QuantizeConfig(bits="auto", budget=3)
    cands = [1, 2, 3, 4, 5, 6, 8]
    q = lambda layer, bits: quantize_any(layer, bits, cfg)  # noqa: E731
    (sensitive, dull), seen = sensitivities(
        twin, [twin.a, twin.b], [cands, cands], [q, q], batches, twin.loss, diagonal=diagonal
    )
    assert seen == 32
    assert all(sensitive[c] == pytest.approx(25 * dull[c], rel=1e-5) for c in cands)  # gradients 5x: Omega 25x
    got = {budget: allot([dull, sensitive], [256, 256], budget * 512) for budget in (1.5, 3, 4, 5.5)}
    assert all(g[1] >= g[0] for g in got.values()), got
    assert any(g[1] > g[0] for g in got.values()), got  # the budget is not just split evenly


def test_sensitivity_is_the_fisher_weighted_error_of_the_grid_the_stage_applies(model, ctx):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)
    layer = model[1]
    batches = list(ctx.calibration_batches(6, batch_size=1))
    grads = []
    for batch in batches:
        model.zero_grad()
        with torch.nn.utils.parametrize.cached():
            w = layer.weight
            grads.append(torch.autograd.grad(ctx.loss(model, batch), w)[0])
    grads = torch.stack(grads).double()
    for cfg in (
        QuantizeConfig(bits="auto", budget=3, granularity="per_channel"),
        QuantizeConfig(bits="auto", budget=3, scheme="asymmetric", step=0.5),
    ):
        q = lambda m, b, cfg=cfg: quantize_any(m, b, cfg)  # noqa: E731
        (block,), _ = sensitivities(model, [layer], [[2, 3]], [q], batches, ctx.loss)
        (diag,), _ = sensitivities(model, [layer], [[2, 3]], [q], batches, ctx.loss, diagonal=True)
        for b in (2, 3):
            applied = clone(model)
            quantize_any(applied[1], b, cfg)
            dw = (applied[1].weight.detach() - layer.weight.detach()).double()
            assert torch.equal(dw, quantization_error(layer, b, q).double())
            assert float(dw[layer.weight.detach() == 0].abs().sum()) == 0  # pruned weights add nothing
            assert block[b] == pytest.approx(float(((grads * dw).sum((1, 2)) ** 2).mean()), rel=1e-4)
            assert diag[b] == pytest.approx(float((grads.pow(2).mean(0) * dw**2).sum()), rel=1e-6)
    assert constraint(layer).quantized is False  # the measurement quantized copies, not the layer


def test_same_seed_gives_the_same_allotment(model, tmp_path):
    def once():
        ctx = Context(data=load_blobs(n=256), seed=3, run_dir=tmp_path)
        rec = auto(clone(model), ctx, budget=2.5, calibration_samples=64)
        return rec["bits_allotted"], rec["predicted_loss_increase"]

    first = once()
    assert once() == first
    assert len(set(first[0].values())) > 1  # a real allotment, not all layers alike


def test_the_record_has_predicted_and_measured_quality(model, ctx):
    rec = auto(model, ctx, budget=2)
    assert rec["predicted_loss_increase"] > 0
    assert isinstance(rec["measured_loss_increase"], float)
    assert 0 <= rec["quality_before_quantize"] <= 1 and 0 <= rec["quality_before_finetune"] <= 1
    assert rec["budget_bits_per_weight"] == 2


# -- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(bits="auto"), "bits=auto needs a budget"),
        (dict(bits=4, budget=3), "budget is set but bits=4"),
        (dict(bits=4, candidates=[2, 4]), "candidates is set but bits=4"),
        (dict(bits="auto", budget=0.5), r"budget=0.5 bits per weight is below .* at least 1"),
        (dict(bits="auto", budget=1.5, scheme="asymmetric"), r"at least 2"),
        (dict(bits="auto", budget=3, scheme="ternary"), "bits=auto with scheme=ternary"),
        (
            dict(bits="auto", budget=3, scheme="asymmetric", candidates=[1, 4]),
            "candidates holds 1 with scheme=asymmetric",
        ),
        (dict(bits="auto", budget={"bits_per_weight": 3, "bytes": 10}), "exactly one of bits_per_weight, bytes"),
        (dict(bits="auto", budget=3, candidates=[]), "distinct whole numbers"),
        (dict(bits="auto", budget=3, candidates=[3, 17]), "distinct whole numbers"),
        (dict(bits="eight"), "whole number of bits 1..16, or auto"),
        (dict(bits=17), "whole number of bits 1..16, or auto"),
    ],
)
def test_bad_auto_settings_are_refused(kw, match):
    with pytest.raises(ValidationError, match=match):
        QuantizeConfig(**kw)


def test_bad_budget_from_the_command_line_names_the_key():
    with pytest.raises(LwpipeError, match=r"stages\.quantize: budget=0\.25 bits per weight .* at least 1"):
        validate(compose_recipe(TINY + ["stages.quantize.bits=auto", "+stages.quantize.budget=0.25"]))
    with pytest.raises(LwpipeError, match=r"stages\.quantize\.budget\.bytes=0"):
        validate(compose_recipe(TINY + ["stages.quantize.bits=auto", "+stages.quantize.budget={bytes:0}"]))
    with pytest.raises(LwpipeError, match="candidates with 1"):
        validate(
            compose_recipe(
                TINY
                + [
                    "pipeline=[train,share,quantize]",
                    "stages.quantize.bits=auto",
                    "+stages.quantize.budget=3",
                    "+stages.quantize.candidates=[1,2]",
                ]
            )
        )


def test_budget_below_one_bit_per_kept_weight_is_refused_before_any_change(model, ctx):
    Prune(PruneConfig(sparsity=0.5)).run(model, ctx)  # 96 kept weights: 1 bit each is 12 bytes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"stages\.quantize\.budget\.bytes=11: .* at least 12 bytes"):
        auto(model, ctx, budget={"bytes": 11})
    with pytest.raises(ConfigError, match=r"stages\.quantize\.budget=3\.0: .* at least 3\.667 bits per weight"):
        auto(model, ctx, budget=3, layers={"1": {"bits": 5}})  # (64 x 5 + 32 x 1) bits over 96 kept weights
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_model_lwp_size_follows_the_allotment(model, ctx, tmp_path):
    sizes, bits = [], []
    for budget in (1, 3, 8):
        m = clone(model)
        rec = auto(m, ctx, budget=budget)
        sizes.append(len(encode_model(m, CONFIG)))
        bits.append(rec["bits_allotted"])
        path = tmp_path / f"{budget}.lwp"
        path.write_bytes(encode_model(m, CONFIG))
        loaded = lwpipe.load(path, constrained=True)
        assert {n: constraint(x).bits for n, x in compressible_layers(loaded)} == rec["bits_allotted"]
        x = torch.randn(16, 8)
        assert torch.equal(loaded(x), m(x))
    assert sizes[0] < sizes[1] < sizes[2], (sizes, bits)


@pytest.mark.slow
def test_cli_bits_auto_on_the_default_model(tmp_path):
    import subprocess
    import sys

    args = [
        "stages.quantize.bits=auto",
        "+stages.quantize.budget=3",
        "stages.train.epochs=3",
        "stages.prune.finetune.epochs=1",
        "stages.share.finetune.epochs=0",
        "stages.quantize.finetune.epochs=1",
        "stages.distill.epochs=0",
        "cache=false",
        "measure.latency=false",
    ]
    p = subprocess.run(
        [sys.executable, "-m", "lwpipe.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr
    assert "bits auto: fc1=" in p.stdout + p.stderr
    (run_dir,) = list((tmp_path / "outputs" / "runs" / "default").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    quant = next(r for r in summary["stages"] if r["stage"] == "quantize")
    assert set(quant["bits_allotted"]) == {"fc1", "fc2", "fc3"}
    assert set(quant["bits_allotted"].values()) <= {2, 3, 4, 5, 6, 8}  # after share: no binary candidate
    assert quant["avg_bits_per_weight"] <= 3
    loaded = lwpipe.load(run_dir / "model.lwp", constrained=True)
    assert {n: constraint(m).bits for n, m in compressible_layers(loaded)} == quant["bits_allotted"]


@pytest.mark.slow
def test_run_recipe_logs_the_allotment_in_metrics(tmp_path):
    final, records = run_recipe(
        TINY
        + [
            "pipeline=[train,prune,quantize]",
            "stages.train.epochs=2",
            "stages.prune.finetune.epochs=0",
            "stages.quantize.bits=auto",
            "+stages.quantize.budget={bytes:40}",
        ],
        tmp_path,
    )
    end = [r for r in records if r["event"] == "stage_end" and r["stage"] == "quantize"][0]
    assert end["quantized_weight_bytes"] <= 40 and set(end["bits_allotted"]) == {"1", "3"}
    prune_end = [r for r in records if r["event"] == "stage_end" and r["stage"] == "prune"][0]
    assert "bits_allotted" not in prune_end
