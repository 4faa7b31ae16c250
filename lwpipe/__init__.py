"""lwpipe: declarative, reproducible model compression (prune, share, quantize, distill).

`lwpipe.load(path)` reads a compressed artifact `model.lwp` back into a plain model (constraints
baked into ordinary weights); `lwpipe.load(path, constrained=True)` gives the trainable constrained form.
"""

from __future__ import annotations

__all__ = ["load"]


def __getattr__(name: str):
    # imported on first use, so that `lwpipe --help` and config validation do not pay for torch
    if name == "load":
        from lwpipe.artifact import load

        return load
    raise AttributeError(f"module 'lwpipe' has no attribute {name!r}")
