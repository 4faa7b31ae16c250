"""Stage name -> stage class. One dict, filled by a decorator.

It lives in the stages package, so that the stages and the registry they register with import nothing of
the core: importing this module imports the package first, whose __init__ imports every built-in stage
(each registers itself). `lwpipe.registry` is this module under its older name (plugins import
``from lwpipe.stages.registry import register``). Third-party stages
are found through the ``lwpipe.stages`` entry-point group: an entry point
``myprune = mypkg.stages:MyPrune`` registers ``MyPrune`` as ``myprune``.

A stage class follows the contract of lwpipe/stages/base.py: a pydantic ``Config`` (extra="forbid"),
``run(model, ctx) -> model``, and declarations (what it leaves on a weight, what it refuses, whether it
trains or needs calibration data, the reference or gradients, whether it must be last, the files it
writes) from which lwpipe/stages/order.py derives every ordering rule. A plugin class that does not derive
from ``Stage`` gets its defaults; one that declares nothing gets the conservative ones and a warning.
"""

from __future__ import annotations

import difflib
import logging
from importlib.metadata import entry_points

from lwpipe.errors import LwpipeError

log = logging.getLogger("lwpipe")

STAGES: dict[str, type] = {}
_plugins_loaded = False


def register(name: str, plugin: bool = False):
    """Registers a stage class as `name`; returns it as a Stage (a plain class gets Stage's defaults)."""

    def deco(cls):
        from lwpipe.stages.base import finish_declarations

        if not hasattr(cls, "Config"):
            raise TypeError(f"stage {name!r} ({cls.__name__}) needs a pydantic Config class")
        full, missing = finish_declarations(cls)
        if plugin and missing:
            log.warning(
                "stage plugin %r (%s) does not declare %s: it is taken to train, to need the reference%s, "
                "and may not be reordered; declare them as class attributes (see lwpipe/stages/base.py)",
                name,
                cls.__name__,
                ", ".join(missing),
                " and to leave any constraint" if "leaves" in missing else "",
            )
        STAGES[name] = full
        full.stage_name = name
        return full

    return deco


def load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    for ep in entry_points(group="lwpipe.stages"):
        if ep.name in STAGES:
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must say so, not vanish
            raise LwpipeError(f"stage plugin {ep.name!r} ({ep.value}) failed to import: {e}") from e
        register(ep.name, plugin=True)(cls)
    _plugins_loaded = True


def known() -> list[str]:
    load_plugins()
    return sorted(STAGES)


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name, known(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"known stages: {', '.join(known())}{hint}"


def get(name: str) -> type | None:
    load_plugins()
    return STAGES.get(name)
