"""Measurement works for every floating dtype torch has: numpy has no bf16, the records must not care."""

import pytest
import torch
from torch import nn

from lwpipe.config import MeasureSettings
from lwpipe.context import Context
from lwpipe.data import load_blobs
from lwpipe.metrics import distinct_nonzero, evaluate, measure
from lwpipe.speed import speed_record
from tests.helpers import TINY, run_recipe

DTYPES = ["bfloat16", "float16", "float64"]


class Typed(nn.Module):
    """Linear(8,16) -> ReLU -> Linear(16,4) held in `dtype`; float32 inputs are cast to it."""

    def __init__(self, in_features: int = 8, num_classes: int = 4, dtype: str = "bfloat16"):
        super().__init__()
        self.dtype = getattr(torch, dtype)
        self.net = nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_classes)).to(self.dtype)

    def forward(self, x):
        return self.net(x.to(self.dtype))


@pytest.mark.parametrize("dtype", DTYPES + ["float8_e4m3fn"])
def test_distinct_nonzero_counts_values_of_any_float_dtype(dtype):
    layer = nn.Linear(4, 3)
    values = torch.tensor([[0.0, 0.5, 0.5, -1.0], [2.0, 0.0, 0.25, 0.5], [-1.0, 0.0, 0.0, 2.0]])
    layer.weight.data = values.to(getattr(torch, dtype))  # exact in every dtype above: 4 distinct non-zeros
    assert distinct_nonzero(layer) == 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_measure_evaluate_and_time_a_model_in_each_dtype(dtype, tmp_path):
    torch.manual_seed(0)
    model = Typed(dtype=dtype)
    ref = Typed(dtype="float32")
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    got, want = measure(model), measure(ref)
    assert got["params"] == want["params"] == 8 * 16 + 16 + 16 * 4 + 4
    assert got["max_unique_weights"] == want["max_unique_weights"]  # every value converts to float32 exactly
    ctx = Context(data=load_blobs(n=64), seed=0, run_dir=tmp_path)
    quality, _ = evaluate(model, ctx.test_loader())
    assert 0 <= quality["accuracy"] <= 1
    timing = speed_record(model, ctx, MeasureSettings(batch=8, repeats=3, warmup=1), None)
    assert timing["macs"] == 8 * 16 + 16 * 4 and timing["latency_ms"]["8"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_run_records_a_model_in_each_dtype(dtype, tmp_path):
    """The baseline record and a quantize stage's (its constraint computes in the model's dtype)."""
    final, records = run_recipe(
        [
            *TINY,
            "model._target_=tests.test_metrics.Typed",
            f"+model.dtype={dtype}",
            "~model.hidden",
            "pipeline=[quantize]",
            "++stages.quantize.finetune.epochs=0",
            "stages.quantize.bits=4",
        ],
        tmp_path,
    )
    assert [r["event"] for r in records] == ["baseline", "stage_end"]
    assert 1 < final["max_unique_weights"] <= 2**4 and final["compressed_bytes"] > 0


def test_distinct_values_of_16_bit_weights_match_a_sort_of_their_float32_values():
    import numpy as np

    from lwpipe.metrics import distinct_16bit

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(300, 70) * 3).to(dtype)
        w[0, :6] = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf")]).to(dtype)
        f = w.float()
        assert distinct_16bit(w) == np.unique(f[f != 0].numpy()).size
