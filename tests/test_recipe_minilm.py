"""recipe=sentence_embedding_minilm on a tiny random BERT sentence model: its layer globs match, every
weight lands on a grid whose step is the recipe's multiple of its layer's std, model.lwp decodes exactly."""
import pytest
import torch

import lwpipe
from lwpipe.constraints import compressible_layers, constraint
from lwpipe.stages.quantize import std_grid
from tests.hf_helpers import make_texts, save_sentence_model, write_txt
from tests.helpers import run_recipe

pytestmark = pytest.mark.slow
STEPS = {"word_embeddings": 0.6, "query": 0.45, "key": 0.45, "value": 0.15, "intermediate.dense": 0.15}


def expected_step(name: str) -> float:
    for end, step in STEPS.items():
        if name.endswith(end):
            return step
    return 0.12 if name.endswith("output.dense") and "attention" not in name else 0.18


def test_minilm_recipe_on_a_tiny_sentence_model(tmp_path):
    from lwpipe.models.sentence import load_sentence_transformer

    st = save_sentence_model(tmp_path / "st")
    rows = make_texts(48)
    train, test = write_txt(tmp_path / "train.txt", rows[:32]), write_txt(tmp_path / "test.txt", rows[32:])
    run_dir = tmp_path / "run"
    final, records = run_recipe(["recipe=sentence_embedding_minilm", f"model.path={st}", f"data.train={train}",
                                 f"data.test={test}", "logger.console=null", "data.max_length=16"], run_dir)
    assert [r["stage"] for r in records if r["event"] == "stage_end"] == ["quantize"]
    assert final["metric"] == "cosine" and 0.5 < final["cosine"] <= 1.0 and final["compression_ratio"] > 3
    original = load_sentence_transformer(str(st))
    model = lwpipe.load(run_dir / "model.lwp", constrained=True)
    originals = dict(compressible_layers(original))
    for name, m in compressible_layers(model):
        c = constraint(m)
        want = std_grid(originals[name].weight.detach(), expected_step(name), 8, "symmetric", False)[2]
        assert c is not None and c.scale.item() == pytest.approx(want.item(), rel=1e-5), name
        q = m.weight.detach() / c.scale
        assert (q - q.round()).abs().max() < 1e-3 and q.abs().max() <= 127 + 1e-3, name
