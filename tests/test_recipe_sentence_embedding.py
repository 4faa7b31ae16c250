"""recipe=sentence_embedding (and its earlier name sentence_embedding_minilm): one quantize stage, no
training, every weight on a per-channel grid whose step is the recipe's multiple of the channel's std, the
Linear layers' levels chosen by GPTQ from data.train; on a tiny random BERT sentence model the run's cosine
is against the original model and model.lwp decodes to the run's model."""

import pytest
import torch
from torch.nn import functional as F

import lwpipe
from lwpipe import frequency
from lwpipe.config import validate
from lwpipe.constraints import compressible_layers, constraint, out_axis
from lwpipe.errors import ConfigError
from lwpipe.runner import run
from lwpipe.stages.quantize import std_grid
from tests.helpers import compose_recipe, run_recipe
from tests.hf_helpers import make_texts, save_sentence_model, write_txt

EMBEDDING_STEP, PRIOR, STEP, BITS = 1.0, 1.0, 0.35, 12
BOUND = 2 ** (BITS - 1) - 1
SMALL = ["logger.console=null", "data.max_length=16"]


def test_the_recipe_is_one_untrained_gptq_quantize_stage_and_the_old_name_is_an_alias():
    new = validate(compose_recipe(["recipe=sentence_embedding", "model.path=DIR"]))
    old = validate(compose_recipe(["recipe=sentence_embedding_minilm", "model.path=DIR"]))
    for recipe in (new, old):
        (q,) = recipe.steps  # nothing trains: data.train only gives GPTQ its input Hessians
        assert q.type == "quantize" and q.config.finetune.epochs == 0 and q.config.bits == BITS
        assert (q.config.method, q.config.sequential, q.config.act_order) == ("gptq", True, True)
        assert (q.config.step, q.config.granularity) == (STEP, "per_channel")
        layers = {k: (v.step, v.frequency_prior) for k, v in q.config.layers.items()}
        assert layers == {"*word_embeddings": (EMBEDDING_STEP, PRIOR)}  # a step per token row by its use
    assert new.steps[0].config == old.steps[0].config
    assert (new.top.name, old.top.name) == ("sentence_embedding", "sentence_embedding_minilm")


def expected_step(name: str, weight: torch.Tensor, train) -> float | torch.Tensor:
    """The token table: a step per row by its token's count in data.train (lwpipe/frequency.py)."""
    if not name.endswith("word_embeddings"):
        return STEP
    steps = frequency.frequency_steps(frequency.token_counts(train, weight.shape[0], "k"), EMBEDDING_STEP, PRIOR)
    return frequency.within_grid(steps, weight, BITS, "symmetric")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sentence_embedding", "sentence_embedding_minilm"])
def test_the_recipe_on_a_tiny_sentence_model(recipe, tmp_path):
    from lwpipe.data.text import load_text
    from lwpipe.models.sentence import load_sentence_transformer
    from lwpipe.tasks import make_task

    st = save_sentence_model(tmp_path / "st")
    rows = make_texts(48)
    train, test = write_txt(tmp_path / "train.txt", rows[:32]), write_txt(tmp_path / "test.txt", rows[32:])
    run_dir = tmp_path / "run"
    final, records = run_recipe(
        [f"recipe={recipe}", f"model.path={st}", f"data.train={train}", f"data.test={test}", *SMALL], run_dir
    )
    (end,) = [r for r in records if r["event"] == "stage_end"]
    assert end["stage"] == "quantize"
    assert final["metric"] == "cosine" and final["compression_ratio"] > 3
    original = load_sentence_transformer(str(st))[0].eval()
    # GPTQ chose the levels of every Linear layer (from data.train); only the embedding tables were rounded
    linears = {n for n, m in compressible_layers(original) if isinstance(m, torch.nn.Linear)}
    assert linears and set(end["gptq_error"]) == linears
    assert end["gptq_rounded_layers"] and all("embeddings" in n for n in end["gptq_rounded_layers"])
    decoded = lwpipe.load(run_dir / "model.lwp").eval()
    data = load_text(str(train), str(test), str(st), "embedding", label_column=None, max_length=16)
    batches = data.test.batches(8)
    task = make_task("embedding")
    with torch.no_grad():
        _, want = task.evaluate(original, batches)
        _, got = task.evaluate(decoded, batches)
    # the recorded quality is the decoded file's cosine to the ORIGINAL model, not to any intermediate one
    assert final["cosine"] == pytest.approx(F.cosine_similarity(got, want, dim=-1).mean().item(), abs=1e-5)
    assert 0.5 < final["cosine"] < 1.0
    model = lwpipe.load(run_dir / "model.lwp", constrained=True)
    originals = dict(compressible_layers(original))
    for name, m in compressible_layers(model):
        c, axis = constraint(m), out_axis(m)
        w = originals[name].weight.detach()
        want_scale = std_grid(w, expected_step(name, w, data.train), BITS, "symmetric", True, axis)[2]
        assert c is not None and torch.allclose(c.scale.reshape(-1), want_scale.reshape(-1), rtol=1e-5), name
        q = m.weight.detach() / c.scale
        assert (q - q.round()).abs().max() < 1e-3 and q.abs().max() <= BOUND + 1e-3, name


@pytest.mark.slow
def test_an_embedding_name_the_model_lacks_is_refused_before_any_work_and_dropping_it_runs(tmp_path):
    """What a user of an encoder that does not call its table word_embeddings meets, and the README's fix."""
    st = save_sentence_model(tmp_path / "st")
    rows = make_texts(24)
    train, test = write_txt(tmp_path / "a.txt", rows[:12]), write_txt(tmp_path / "b.txt", rows[12:])
    data = [f"data.train={train}", f"data.test={test}"]
    base = ["recipe=sentence_embedding", f"model.path={st}", *data, *SMALL, "cache=false", "measure.latency=false"]
    # the same recipe with the embedding table under another name: as if the model called it embed_tokens
    renamed = [*base, "~stages.quantize.layers", "+stages.quantize.layers={embed_tokens:{step:0.8}}"]
    with pytest.raises(ConfigError, match=r"stages.quantize.layers.*embed_tokens.*matches no compressible layer"):
        run(validate(compose_recipe(renamed)), tmp_path / "refused")
    assert not (tmp_path / "refused" / "model.lwp").exists()
    final, _ = run_recipe([*base, "~stages.quantize.layers"], tmp_path / "uniform")
    assert final["metric"] == "cosine" and 0.5 < final["cosine"] <= 1.0
