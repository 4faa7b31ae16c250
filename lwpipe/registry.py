"""Stage name -> stage class. One dict, filled by a decorator.

Built-in stages are imported explicitly (lwpipe.stages); third-party stages
are found through the ``lwpipe.stages`` entry-point group: an entry point
``myprune = mypkg.stages:MyPrune`` registers ``MyPrune`` as ``myprune``.

A stage class has a pydantic ``Config`` (extra="forbid"), a ``compresses``
flag (does it leave a constraint on the weights?), optionally
``check_order(cfg, before) -> str | None`` to refuse an order that cannot work
(``before``: the earlier ``config.Step``s, each with ``.name``, ``.type``, ``.config``),
and ``run(model, ctx) -> model``; it is built as ``StageClass(config)``.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from lwpipe.errors import LwpipeError

STAGES: dict[str, type] = {}
_plugins_loaded = False


def register(name: str):
    def deco(cls):
        if not hasattr(cls, "Config"):
            raise TypeError(f"stage {name!r} ({cls.__name__}) needs a pydantic Config class")
        STAGES[name] = cls
        cls.stage_name = name
        return cls

    return deco


def load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    import lwpipe.stages  # noqa: F401  (registers the built-in stages)

    for ep in entry_points(group="lwpipe.stages"):
        if ep.name in STAGES:
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must say so, not vanish
            raise LwpipeError(f"stage plugin {ep.name!r} ({ep.value}) failed to import: {e}") from e
        register(ep.name)(cls)
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
