"""`sweep=NAME` names a preset in recipes/sweep/; a misspelt one is an error, never the basic launcher."""

import pytest
from hydra.errors import MissingConfigException

from lwpipe.cli import check_presets
from tests.helpers import compose_recipe


@pytest.mark.parametrize("arg", ["sweep=nosuch_preset", "sweep=optna", "+sweep=optna"])
def test_unknown_preset_lists_the_presets(capsys, arg):
    with pytest.raises(SystemExit) as e:
        check_presets(["model=tiny", arg])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"sweep='{arg.partition('=')[2]}': no such preset" in err and "joblib, optuna, ray, submitit" in err


def test_known_presets_pass():
    check_presets(["sweep=optuna", "sweep=joblib", "stages.prune.sparsity=0.5"])


def test_composing_an_unknown_preset_fails_too():
    with pytest.raises(MissingConfigException, match="sweep/optna"):
        compose_recipe(["sweep=optna"])
    compose_recipe(["sweep=joblib"])
