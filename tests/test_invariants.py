"""Every ordering of {prune, share, quantize, distill}: refused at validation with a reason, or run
with nothing undone. Checked on the real weights of each stage's checkpoint AND in metrics.jsonl."""

import itertools
import re

import pytest
import torch

from lwpipe import checkpoint
from lwpipe.config import validate
from lwpipe.constraints import compressible_layers, constraint, effective_tensors
from lwpipe.errors import LwpipeError
from lwpipe.models import TinyMLP
from tests.helpers import TINY, compose_recipe, run_recipe

SPARSITY, SHARE_BITS, QUANT_BITS = 0.5, 2, 3
FAST = TINY + [
    "cache=false",
    "artifact=false",
    "logger.console=null",
    "stages.train.epochs=3",
    f"stages.prune.sparsity={SPARSITY}",
    "stages.prune.finetune.epochs=1",
    f"stages.share.bits={SHARE_BITS}",
    "stages.share.finetune.epochs=1",
    f"stages.quantize.bits={QUANT_BITS}",
    "stages.quantize.finetune.epochs=1",
    "stages.distill.epochs=1",
]
ORDERS = list(itertools.permutations(["prune", "share", "quantize", "distill"]))


def refused(order) -> bool:
    return order.index("quantize") < order.index("share")


def overrides(order):
    return FAST + [f"pipeline=[train,{','.join(order)}]"]


def distinct_nonzero(w):
    return torch.unique(w[w != 0]).numel()


@pytest.mark.parametrize("order", [o for o in ORDERS if refused(o)], ids="-".join)
def test_impossible_order_is_refused_with_reason(order):
    with pytest.raises(LwpipeError) as e:
        validate(compose_recipe(overrides(order)))
    assert re.search(r"pipeline\[\d\]='share': cannot follow \[.*'quantize'.*\]", str(e.value))
    assert "integer grid" in str(e.value)


@pytest.mark.parametrize("order", [o for o in ORDERS if not refused(o)], ids="-".join)
def test_possible_order_keeps_every_earlier_gain(order, tmp_path):
    _, records = run_recipe(overrides(order), tmp_path)
    done: list[str] = []
    pruned_zeros, zeros, seen_sparsity = None, None, 0.0
    for step, name in enumerate(["train", *order], 1):  # step 0 is the baseline
        done.append(name)
        model = checkpoint.load_state(TinyMLP(), tmp_path / "checkpoints" / f"{step:02d}_{name}.safetensors")
        layers = dict(compressible_layers(model))
        ws = {n: m.weight.detach() for n, m in layers.items()}
        if name == "prune":
            pruned_zeros = {n: w == 0 for n, w in ws.items()}
        if pruned_zeros is not None:  # the zeros prune set are still zeros, wherever prune came
            for n, w in ws.items():
                assert (w[pruned_zeros[n]] == 0).all(), f"{n} re-grew pruned weights after {done}"
                assert (w == 0).float().mean() >= SPARSITY - 1e-6
        if zeros is not None:  # from the first compression stage on, a zero stays a zero
            for n, w in ws.items():
                assert (w[zeros[n]] == 0).all(), f"{n} revived zeros after {done}"
        if name != "train" and (name != "distill" or zeros is not None):
            zeros = {n: w == 0 for n, w in ws.items()}
        if "share" in done:
            for n, w in ws.items():
                assert distinct_nonzero(w) <= 2**SHARE_BITS, f"{n} left its codebook after {done}"
        if "quantize" in done:
            for n, m in layers.items():
                c = constraint(m)
                q = ws[n] / c.scale + c.zero_point
                assert (q - q.round()).abs().max() < 1e-3, f"{n} left its grid after {done}"
                assert c.qmin - 1e-3 <= q.min() and q.max() <= c.qmax + 1e-3
                assert distinct_nonzero(ws[n]) < 2**QUANT_BITS

        # what the user sees in metrics.jsonl says the same, at the stage end and at every fine-tune epoch
        # every parameter counts (biases too), not only the compressed weights
        params = effective_tensors(model).values()
        total = sum(t.numel() for t in params)
        end = next(r for r in records if r["step"] == step and r["event"] == "stage_end")
        assert end["sparsity"] == pytest.approx(sum(int((t == 0).sum()) for t in params) / total)
        assert end["max_unique_weights"] == max(distinct_nonzero(w) for w in ws.values())
        for r in (r for r in records if r["step"] == step):
            if zeros is not None:
                assert r["sparsity"] >= seen_sparsity - 1e-9, f"sparsity dropped in {r}"
            if pruned_zeros is not None:  # the weights are half of the parameters or more: biases are few
                assert r["sparsity"] >= SPARSITY * sum(w.numel() for w in ws.values()) / total - 1e-6
            if "share" in done:
                assert r["max_unique_weights"] <= 2**SHARE_BITS
        if zeros is not None:
            seen_sparsity = end["sparsity"]
