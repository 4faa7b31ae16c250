"""Every quality figure that compares two models compares with the uncompressed one."""

import pytest

from tests.helpers import run_recipe
from tests.hf_helpers import make_texts, save_sentence_model, write_txt


@pytest.mark.slow
def test_bits_auto_reports_an_encoders_cosine_to_the_uncompressed_model(tmp_path):
    """quality_before_quantize of a pruned encoder is the prune stage's cosine, not the model against itself."""
    rows = make_texts(48)
    final, records = run_recipe(
        [
            "recipe=sentence_embedding",
            f"model.path={save_sentence_model(tmp_path / 'st')}",
            f"data.train={write_txt(tmp_path / 'a.txt', rows[:32])}",
            f"data.test={write_txt(tmp_path / 'b.txt', rows[32:])}",
            "data.batch_size=8",
            "data.max_length=16",
            "eval.batch_size=16",
            "pipeline=[prune,quantize]",
            "++stages.prune.sparsity=0.6",
            "stages.quantize.bits=auto",
            "+stages.quantize.budget={bits_per_weight:4}",
            "++stages.quantize.candidates=[2,4,8]",
        ],
        tmp_path / "run",
    )
    pruned = [r for r in records if r["event"] == "stage_end" and r["stage"] == "prune"][0]
    assert pruned["cosine"] < 0.999
    assert final["quality_before_quantize"] == pytest.approx(pruned["cosine"])
    assert final["quality_before_finetune"] == pytest.approx(final["cosine"])  # no fine-tuning: the stage's end
    assert final["measured_loss_increase"] == pytest.approx(pruned["cosine"] - final["cosine"])
    assert final["reference"] == "uncompressed"
