"""The run's input model kept on disk instead of in memory: cached stage states are loaded into fresh copies of it.

    kept = InputCopy(model, path)   # every parameter and buffer written to `path` (safetensors); a meta-device
                                    # skeleton of the model kept (no memory for its tensors)
    fresh = kept.restore()          # a model equal to a deep copy of the input, read back from the file
    kept.close()                    # the file removed

A large model's run thereby holds one model, not two, when the stage cache is on.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too), each tensor once, by name."""
    out = dict(model.named_parameters())
    out.update((n, b) for n, b in model.named_buffers() if b is not None)
    return out


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device: no memory, ties kept."""
    return copy_to(model, "meta")


def copy_to(model: nn.Module, device: str) -> nn.Module:
    """A deep copy with uninitialised parameters and buffers on `device` (a tensor under several names stays
    one tensor); parametrized modules get classes of their own, as model_layers.clone gives them."""
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        if id(t) not in memo:
            empty = torch.empty(t.shape, dtype=t.dtype, device=device)
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    copied = copy.deepcopy(model, memo)
    for m in copied.modules():
        if parametrize.is_parametrized(m):
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return copied


class InputCopy:
    def __init__(self, model: nn.Module, path: Path):
        self.path = Path(path)
        state = {n: t.detach().contiguous().cpu() for n, t in tensors(model).items()}
        save_file(state, str(self.path))
        del state
        self.skeleton = meta_skeleton(model)

    @torch.no_grad()
    def restore(self) -> nn.Module:
        """A fresh model equal to the input: the skeleton's copy, its tensors read from the file."""
        model = copy_to(self.skeleton, "cpu")
        with safe_open(str(self.path), framework="pt") as f:
            for name, t in tensors(model).items():
                t.copy_(f.get_tensor(name))
        return model

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
