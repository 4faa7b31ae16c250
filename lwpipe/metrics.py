"""What the runner records after every step: held-out quality and the model's size."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from lwpipe.constraints import compressible_layers, effective_tensors, parameter_shapes


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, labels over the whole loader (model in eval mode, constraints computed once)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    with parametrize.cached():
        for x, y in loader:
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader: Iterable, reference: torch.Tensor | None = None) -> dict:
    """accuracy and loss on held-out data; teacher_agreement against reference predictions."""
    logits, labels = predict(model, loader)
    pred = logits.argmax(1)
    out = {
        "accuracy": (pred == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }
    out["teacher_agreement"] = (pred == reference).float().mean().item() if reference is not None else 1.0
    return out, pred


@torch.no_grad()
def measure(model: nn.Module) -> dict:
    """Size statistics of the weights the model actually computes with."""
    tensors = effective_tensors(model)
    names = parameter_shapes(model)
    params = {k: v for k, v in tensors.items() if k in names}
    n_params = sum(v.numel() for v in params.values())
    nonzero = sum(int(v.count_nonzero()) for v in params.values())
    weights, zeros, max_unique = 0, 0, 0
    for name, m in compressible_layers(model):
        w = tensors[f"{name}.weight" if name else "weight"]
        weights += w.numel()
        nz = w[w != 0]
        zeros += w.numel() - nz.numel()
        max_unique = max(max_unique, int(np.unique(nz.cpu().numpy()).size))  # 10x torch.unique on CPU
    return {
        "params": n_params,
        "nonzero_params": nonzero,
        "sparsity": zeros / weights if weights else 0.0,
        "max_unique_weights": max_unique,
        "dense_bytes": 4 * n_params,
    }
