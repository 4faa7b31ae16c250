"""Compute cost in every record: latency of the deployable form and multiply-accumulates per example.

    latency_ms  {"1": ms, "<measure.batch>": ms}: median of `repeats` timed forwards after `warmup`
                untimed ones, on the run's device, under inference_mode, of the form `latency_form` names:
                "plain" (a model without constraints, as it is: the input model, a structurally pruned
                one), "baked" (a copy with every constraint baked into plain weights: what is deployed,
                not the parametrized training form, which recomputes its weights on every call), or
                after `export` the exported file itself, e.g. "export.pt int8" (see `Exported`).
    macs        multiply-accumulates per example of Linear / Conv / transformers' Conv1D layers at
                their current shapes (dense: masked zeros still cost; structured pruning shrinks it).
    speedup     {"1": x, ...}: the input model's median ms / this one's.
    latency_seconds  wall time spent timing, so that the runner-overhead figure can leave it out.

The batches are the first test examples, fed through `ctx.task.forward(model, batch)` when the
context has a task (text models) and `model(x)` otherwise.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe.compressed import original_weight
from lwpipe.errors import ConfigError
from lwpipe.tasks import batch_len, head, model_device, to_device


@dataclass
class Exported:
    """The file an `export` stage wrote of `model`, loaded back (ctx.exported): timed in its record."""

    model: nn.Module
    form: nn.Module
    name: str  # e.g. "export.pt int8"


def exported_form(model: nn.Module, ctx) -> Exported | None:
    exported = getattr(ctx, "exported", None)
    return exported if exported is not None and exported.model is model else None


def timed_form(model: nn.Module, ctx) -> tuple[nn.Module, str]:
    """(what latency is measured on, its name for the record's `latency_form`)."""
    exported = exported_form(model, ctx)
    if exported is not None:
        return exported.form, exported.name
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        from lwpipe.export import plain_copy  # a copy for the timing only: the model keeps its constraints

        return plain_copy(model), "baked"
    return model, "plain"


DEFAULT_BATCH = 256


def batch_sizes(settings, ctx) -> list[int]:
    n = settings.batch or min(DEFAULT_BATCH, test_size(ctx))
    return sorted({1, n})


def test_size(ctx) -> int:
    return sum(batch_len(b) for b in ctx.test_loader())


def check_settings(settings, ctx) -> None:
    """Before any work: the test set must hold the largest latency batch."""
    if settings.latency and settings.batch and settings.batch > (n := test_size(ctx)):
        raise ConfigError("measure.batch", settings.batch, f"must be at most the test set's {n} examples")


# -- batches of any shape: tensors, (x, y) tuples, dicts of tensors --------------------------------
def _cat(batches: list):
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: _cat([b[k] for b in batches]) for k in first}
    return type(first)(_cat(list(parts)) for parts in zip(*batches))


def first_examples(ctx, n: int, device=None):
    """The first n test examples as one batch, on `device` (the run's by default)."""
    got, have = [], 0
    for b in ctx.test_loader():
        got.append(head(b, n - have))
        have += batch_len(got[-1])
        if have >= n:
            break
    return to_device(_cat(got) if len(got) > 1 else got[0], device or ctx.device)


def forward_fn(ctx):
    task = getattr(ctx, "task", None)
    if task is not None:
        return lambda model, batch: task.forward(model, batch)
    return lambda model, batch: model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _eval(model: nn.Module, training: bool) -> None:
    try:
        model.train(training)
    except NotImplementedError:  # a torch.export module has no train/eval switch: it is eval already
        pass


# -- the measures ----------------------------------------------------------------------------------
def _sync(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def median_ms(model: nn.Module, run, batch, repeats: int, warmup: int, max_seconds: float, device=None) -> float:
    """Median wall milliseconds of run(model, batch): `warmup` untimed calls, then up to `repeats`
    timed ones (at least 3, fewer than `repeats` once `max_seconds` is spent)."""
    was_training = model.training
    _eval(model, False)
    times = []
    try:
        with parametrize.cached():
            for _ in range(warmup):
                run(model, batch)
            _sync(device)
            budget = time.perf_counter() + max_seconds
            for i in range(repeats):
                t = time.perf_counter()
                run(model, batch)
                _sync(device)
                times.append(time.perf_counter() - t)
                if i >= 2 and time.perf_counter() > budget:
                    break
    finally:
        _eval(model, was_training)
    return 1000 * statistics.median(times)


@torch.no_grad()
def count_macs(model: nn.Module, run, batch) -> int:
    """Multiply-accumulates per example of the Linear / Conv / Conv1D layers in one forward."""
    total = [0]

    def hook(m, inputs, out):
        if isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            total[0] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        else:  # transformers' Conv1D: weight (in, out)
            total[0] += out.numel() * original_weight(m).shape[0]  # not the computed weight

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or type(m).__name__ == "Conv1D"
    ]
    was_training = model.training
    try:
        _eval(model, False)
        with torch.no_grad():  # each constrained weight computed as its layer runs, not all held at once
            run(model, batch)
    finally:
        _eval(model, was_training)
        for h in handles:
            h.remove()
    return total[0] // max(batch_len(batch), 1)


def speed_record(model: nn.Module, ctx, settings, baseline: dict | None) -> dict:
    """The record fields: macs always; latency_ms, latency_form, speedup and latency_seconds unless
    latency is off."""
    run = forward_fn(ctx)
    device = model_device(model)  # the run's, except after an int8 export (CPU kernels: the model moved there)
    one = first_examples(ctx, 1, device)
    exported = exported_form(model, ctx)
    try:
        macs = count_macs(exported.form, run, one) if exported is not None else 0
    except Exception:
        macs = 0
    # an exported graph (TorchScript, int8) calls no hookable modules: count on the model it was made from
    out = {"macs": macs or count_macs(model, run, one)}
    if not settings.latency:
        return out
    t, threads = time.perf_counter(), torch.get_num_threads()
    form, out["latency_form"] = timed_form(model, ctx)
    lat = {}
    try:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        for n in batch_sizes(settings, ctx):
            batch = one if n == 1 else first_examples(ctx, n, device)
            lat[str(n)] = median_ms(form, run, batch, settings.repeats, settings.warmup, settings.max_seconds, device)
    finally:
        torch.set_num_threads(threads)
    base = (baseline or {}).get("latency_ms") or lat
    out["latency_ms"] = lat
    if device.type != getattr(ctx.device, "type", "cpu"):  # speedup then compares two devices: say so
        out["latency_device"] = device.type
    out["speedup"] = {k: base[k] / v for k, v in lat.items() if k in base and v > 0}
    out["latency_seconds"] = time.perf_counter() - t
    return out
