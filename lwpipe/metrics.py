"""What the runner records after every step: held-out quality and the model's size."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.constraints import compressible_layers, effective_tensors, parameter_shapes
from lwpipe.tasks import model_device, to_device
from lwpipe.tasks.classification import Classification


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, task=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (logits or embeddings), labels over the whole loader (eval mode, constraints computed once)."""
    task = task or Classification()
    was_training = model.training
    model.eval()
    device = model_device(model)
    outputs, labels = [], []
    with parametrize.cached():
        for batch in loader:
            batch = to_device(batch, device)
            outputs.append(task.forward(model, batch).float().cpu())
            if isinstance(batch, dict):
                labels.append(batch["labels"].cpu() if "labels" in batch else torch.zeros(0))
            else:
                labels.append(batch[1].cpu())
    model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)


def evaluate(model: nn.Module, loader: Iterable, reference=None, task=None) -> tuple[dict, object]:
    """(quality metrics, outputs) on held-out data: the task's metrics (classification: accuracy, loss,
    teacher_agreement against reference predictions), `metric` and `quality`; outputs are what a later
    model's are compared with."""
    return (task or Classification()).evaluate(model, loader, reference)


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
