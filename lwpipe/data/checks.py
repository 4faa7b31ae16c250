"""Checks on loaded data that any data source needs, run before any work (runner.run, before check_fit).

Without them a bad data set ends, after a run directory was made, in a raw traceback from deep inside
training (`Target 200 is out of bounds`, `mat1 and mat2 shapes cannot be multiplied`). Each check names
the split, the sample and what was expected. Loaders check what only they know (mnist.py names the file).
"""

from __future__ import annotations

import torch
from torch import nn

from lwpipe.data.bundle import DataBundle
from lwpipe.errors import ConfigError


def _error(data: DataBundle, what: str) -> ConfigError:
    return ConfigError("data", data.name, what)


def _first(ds, split: str, data: DataBundle):
    try:
        sample = ds[0]
    except Exception as e:
        raise _error(data, f"the {split} split's first sample cannot be read: {e}") from None
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        raise _error(data, f"a {split} sample is {type(sample).__name__}, expected an (input, label) pair")
    return sample


def labels(ds) -> torch.Tensor | None:
    """All labels of a TensorDataset-like split (inputs, labels); None for other datasets."""
    tensors = getattr(ds, "tensors", None)
    return tensors[1] if isinstance(tensors, (tuple, list)) and len(tensors) >= 2 else None


def output_classes(model: nn.Module, x: torch.Tensor, device) -> int | None:
    """How many classes the model scores (its last output dimension), None when it does not run on x or its
    output is not (batch, classes): check_fit then reports the mismatch."""
    try:
        with torch.no_grad():
            out = model.eval()(x.unsqueeze(0).to(device))
    except Exception:
        return None
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def check_data(data: DataBundle, model: nn.Module, device="cpu") -> None:
    """ConfigError naming the problem when a split is empty, the splits' inputs differ in shape, a label
    is not one integer, or a label is outside the model's classes."""
    for split, ds in (("train", data.train), ("test", data.test)):
        if len(ds) == 0:
            raise _error(data, f"the {split} split is empty; both splits need samples")
    (x_train, y_train), (x_test, y_test) = (
        _first(ds, s, data)[:2] for s, ds in (("train", data.train), ("test", data.test))
    )
    if torch.is_tensor(x_train) and torch.is_tensor(x_test) and x_train.shape != x_test.shape:
        raise _error(
            data,
            f"train inputs are {tuple(x_train.shape)} but test inputs are {tuple(x_test.shape)}; "
            f"both splits need inputs of one shape",
        )
    classes = output_classes(model, x_test, device) if torch.is_tensor(x_test) else None
    for split, ds, first in (("train", data.train, y_train), ("test", data.test, y_test)):
        y = labels(ds)
        y = y if y is not None else torch.as_tensor(first).reshape(1, *torch.as_tensor(first).shape)
        if y.dim() != 1:
            raise _error(data, f"the {split} labels have shape {tuple(y.shape)}; expected one integer per sample")
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
            continue  # not class labels (a regression or embedding target): nothing to hold them to
        low, high = int(y.min()), int(y.max())
        if low < 0 or (classes is not None and high >= classes):
            bad = low if low < 0 else high
            at = int((y == bad).nonzero()[0])
            allowed = (
                f"the model scores {classes} classes, so labels must be 0..{classes - 1}"
                if classes is not None
                else "labels must be >= 0"
            )
            raise _error(data, f"the {split} split has label {bad} (sample {at}); {allowed}")
