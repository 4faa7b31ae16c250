"""Recipe validation: every bad input is one clear message naming key, value and what is allowed."""

import pytest

from lwpipe.config import validate
from lwpipe.errors import LwpipeError
from tests.helpers import TINY, compose_recipe


def error_of(overrides):
    with pytest.raises(LwpipeError) as e:
        validate(compose_recipe(overrides))
    return str(e.value)


def test_default_recipe_validates():
    recipe = validate(compose_recipe())
    assert [s.name for s in recipe.steps] == list(recipe.top.pipeline)
    assert all(s.cls.Config.model_config["extra"] == "forbid" for s in recipe.steps)


def test_unknown_stage_lists_known_and_suggests_closest():
    msg = error_of(["pipeline=[train,pruen]"])
    assert "pipeline[1]='pruen'" in msg
    assert "known stages:" in msg and "train" in msg
    assert "did you mean 'prune'" in msg


def test_unknown_key_under_stage_names_full_path():
    msg = error_of(["+stages.prune.sparsty=0.5"])
    assert "stages.prune.sparsty" in msg and "unknown key" in msg


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_outside_range(value):
    msg = error_of([f"stages.prune.sparsity={value}"])
    assert f"stages.prune.sparsity={float(value)!r}" in msg
    assert "greater than or equal to 0" in msg or "less than 1" in msg


def test_pipeline_entry_without_settings_or_plugin():
    msg = error_of(["pipeline=[train,prune_b]"])
    assert "pipeline[1]='prune_b'" in msg and "no settings under stages.prune_b" in msg


def test_type_key_lets_two_entries_share_a_plugin():
    recipe = validate(
        compose_recipe(
            TINY
            + [
                "pipeline=[prune_a,prune_b]",
                "+stages.prune_a={type: prune, sparsity: 0.5}",
                "+stages.prune_b={type: prune, sparsity: 0.8, criterion: taylor}",
            ]
        )
    )
    assert [(s.name, s.type) for s in recipe.steps] == [("prune_a", "prune"), ("prune_b", "prune")]
    assert recipe.steps[1].config.criterion == "taylor"


def test_settings_without_plugin_must_name_a_type():
    msg = error_of(["+stages.prune_c={sparsity: 0.5}"])
    assert "stages.prune_c" in msg and "set stages.prune_c.type" in msg


def test_unknown_type_suggests():
    msg = error_of(["+stages.p2={type: prnue}"])
    assert "stages.p2.type='prnue'" in msg and "did you mean 'prune'" in msg


def test_bad_literal_lists_allowed_values():
    msg = error_of(["stages.prune.criterion=weight"])
    assert "stages.prune.criterion='weight'" in msg and "'magnitude'" in msg and "'taylor'" in msg


def test_inconsistent_prune_settings_refused():
    msg = error_of(["+stages.prune.granularity=structured", "+stages.prune.scope=global"])
    assert "stages.prune" in msg and "global" in msg


def test_unknown_top_level_key():
    msg = error_of(["+sed=1"])
    assert "sed" in msg and "unknown key" in msg


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("+stages.prune.sparsty=0.9", "stages.prune.sparsty: unknown key (value 0.9); did you mean 'sparsity'?"),
        (
            "+stages.prune.finetune.epoch=3",
            "stages.prune.finetune.epoch: unknown key (value 3); did you mean 'epochs'?",
        ),
        (
            "+stages.prune.layers={fc3: {sparsty: 0.5}}",
            "stages.prune.layers.fc3.sparsty: unknown key (value 0.5); did you mean 'sparsity'?",
        ),
        ("+measure.repeat=3", "measure.repeat: unknown key (value 3); did you mean 'repeats'?"),
    ],
)
def test_unknown_key_suggests_the_nearest_key(override, suggestion):
    msg = error_of([override])
    assert suggestion in msg and "\n" not in msg


def test_unknown_key_without_a_near_one_lists_the_keys():
    msg = error_of(["+stages.prune.zzzzzz=1"])
    assert "check its spelling" in msg and "did you mean" not in msg and "sparsity, quality" in msg
