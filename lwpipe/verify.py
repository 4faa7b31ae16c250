"""A run's self-check: the model.lwp it wrote loads (as a user loads it) to exactly the model it came from,
so a run never reports success with a file nothing can read."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lwpipe.constraints import effective_tensors
from lwpipe.errors import LwpipeError


def verify_artifact(path: Path, model: nn.Module) -> None:
    """The written model.lwp loads (lwpipe.load, as a user loads it) to exactly the weights `model` computes
    with; LwpipeError otherwise, so a run never reports success with a file nothing can read."""
    from lwpipe.artifact import ArtifactError, load

    try:
        loaded = load(path, trusted=True)  # the run built this very config itself
    except ArtifactError as e:
        raise LwpipeError(f"the run's own {path.name} does not load, so the run failed: {e}") from None
    wrong = artifact_mismatch(loaded, model)
    if wrong:
        raise LwpipeError(
            f"the run's own {path.name} decodes to other weights than the model it was written "
            f"from ({wrong}), so the run failed"
        )


@torch.no_grad()
def artifact_mismatch(loaded: nn.Module, model: nn.Module) -> str | None:
    """The first tensor of `loaded` that `model` (constraints applied) does not compute bit for bit; None."""
    modules = dict(model.named_modules())
    for name, got in effective_tensors(loaded).items():
        owner, _, attr = name.rpartition(".")
        want = getattr(modules.get(owner), attr, None)
        if not isinstance(want, torch.Tensor):
            return f"{name}: the model has no such tensor"
        if not same_values(want.detach().cpu(), got):
            return f"{name} differs"
    return None


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values (NaN where the other has NaN; a float16-stored bias equals its float32 value)."""
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
