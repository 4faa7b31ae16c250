"""Block-sequential calibration: one transformer block's activations alive at a time.

As the GPTQ paper (Frantar et al. 2022) and llm-compressor's sequential pipeline do: the inputs of the
first of the model's repeated blocks are captured on the calibration batches (a forward pre-hook that
stores them and raises, so nothing after the block runs), then for each block in turn its layers' input
Hessians are gathered by running that block alone on the carried inputs (float32 sums), the block is
compressed (GPTQ, SparseGPT: the quantize or prune stage does it between two calls), and the compressed block's outputs
replace the carried inputs for the next block. The model is never copied and the rest of the model never
runs again; memory is the model, one block's inputs over the calibration set and one batch's activations.

Layers before the first block and after the last (a classifier or pooler head) are calibrated by a pass
of the whole model, as without `sequential`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from lwpipe import gptq
from lwpipe.calibration import Forward
from lwpipe.errors import ConfigError
from lwpipe.memory import release_freed_memory
from lwpipe.tasks import to_device


class _Captured(Exception):
    """Raised by the first block's pre-hook: its inputs are stored, the rest of the forward is skipped."""


@dataclass
class Carried:
    """One calibration batch's inputs of the current block."""

    args: tuple
    kwargs: dict
    mask: torch.Tensor | None  # the batch's attention mask: padding is no calibration data


def named_blocks(model: nn.Module, name: str | None) -> list[tuple[str, nn.Module]]:
    """The blocks `calibration.blocks` names (a ModuleList's qualified name), else those found by structure."""
    if name is None:
        return gptq.find_blocks(model)
    try:
        found = model.get_submodule(name)
    except AttributeError:
        found = None
    if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        raise ConfigError(
            "calibration.blocks",
            name,
            f"is not a non-empty ModuleList of {type(model).__name__}; its module lists: {', '.join(lists) or 'none'}",
        )
    return [(f"{name}.{i}", b) for i, b in enumerate(found)]


def limited(batches: Iterable, samples: int, seq_len: int | None) -> Iterable:
    """The batches cut to `samples` examples in all and, for token batches, to `seq_len` tokens each."""
    left = samples
    for batch in batches:
        if left <= 0:
            return
        rows = len(batch["input_ids"]) if isinstance(batch, dict) else len(batch[0])
        take = min(rows, left)
        left -= take
        if isinstance(batch, dict):
            t = batch["input_ids"].shape[1] if batch["input_ids"].dim() > 1 else None
            cut = slice(None, seq_len) if seq_len is not None and t is not None else slice(None)
            yield {k: v[:take, cut] if _tokens(v, batch) else v[:take] for k, v in batch.items()}
        else:
            yield type(batch)(v[:take] for v in batch)


def _tokens(v: torch.Tensor, batch: dict) -> bool:
    ids = batch["input_ids"]
    return v.dim() >= 2 and ids.dim() >= 2 and tuple(v.shape[:2]) == tuple(ids.shape[:2])


class Calibrator:
    """Input Hessians for the groups of layers a one-shot stage compresses in turn (`groups`), block by block
    when `settings.sequential` (lwpipe.config.CalibrationSettings). `strict`: a model without repeated blocks
    under sequential is a ConfigError (else one group, the whole model)."""

    def __init__(self, model: nn.Module, settings, strict: bool = True):
        self.model, self.settings, self.strict = model, settings, strict
        self.batches: Callable[[], Iterable] = list
        self.forward: Forward | None = None
        self.blocks: list[tuple[str, nn.Module]] = []
        self.carried: list[Carried] | None = None
        self.at = 0  # the block whose inputs `carried` holds

    def groups(self, names: list[str]) -> list[list[str]]:
        """Layer names in the order they are compressed: one group, or before / each block / after."""
        if not self.settings.sequential:
            return [names]
        self.blocks = named_blocks(self.model, self.settings.blocks)
        if not self.blocks:
            if self.strict:
                raise ConfigError(
                    "calibration.sequential",
                    True,
                    f"{type(self.model).__name__} has no repeated blocks (a ModuleList of two or more blocks of "
                    f"one class holding Linear layers); name them with calibration.blocks, or set "
                    f"calibration.sequential=false",
                )
            return [names]
        return gptq.sequential_groups(names, [b for b, _ in self.blocks])

    def block_of(self, names) -> int | None:
        """The block holding every one of `names`; None when they are outside the blocks (or span several)."""
        found = {next((i for i, (b, _) in enumerate(self.blocks) if n.startswith(b + ".")), None) for n in names}
        return found.pop() if len(found) == 1 else None

    def hessians(
        self, layers: dict[str, nn.Module], batches: Callable[[], Iterable], forward: Forward
    ) -> tuple[dict[str, torch.Tensor], int]:
        """(name -> H, calibration batches seen) for `layers`, through the model as it is now; `batches()` gives
        a fresh iterable of calibration batches, `forward(model, batch)` feeds one to the model."""
        self.batches, self.forward = batches, forward
        index = self.block_of(layers) if self.blocks else None
        if index is None:
            return gptq.input_hessians(self.model, layers, batches(), forward)
        return self.block_hessians(index, layers)

    def supported_hessians(
        self, layers: dict[str, nn.Module], batches: Callable[[], Iterable], forward: Forward, no_data: Callable
    ) -> tuple[dict[str, torch.Tensor], int]:
        """`hessians` of those of `layers` GPTQ's math takes (lwpipe.gptq.supports; ({}, 0) when none does);
        `no_data()`: the error raised when the calibration data gives no batch."""
        able = {n: m for n, m in layers.items() if gptq.supports(m)}
        if not able:
            return {}, 0
        hs, seen = self.hessians(able, batches, forward)
        if not seen:
            raise no_data()
        return hs, seen

    @torch.no_grad()
    def block_hessians(self, index: int, layers: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], int]:
        if self.carried is None:
            self.capture()
        while self.at < index:  # the blocks compressed since: their outputs are the next block's inputs
            self.advance()
        sums, mask = gptq.HessianSums(), [None]
        hooks = [m.register_forward_pre_hook(sums.hook(n, m, mask), with_kwargs=True) for n, m in layers.items()]
        try:
            with evaluating(self.model), parametrize.cached():
                for c in self.carried:
                    mask[0] = c.mask
                    self.blocks[index][1](*c.args, **c.kwargs)
        finally:
            for h in hooks:
                h.remove()
        seen = len(self.carried)
        if index == len(self.blocks) - 1:
            self.carried = None  # the last block: nothing is carried further
        return sums.result(), seen

    @torch.no_grad()
    def capture(self) -> None:
        """The first block's inputs (positional and keyword: masks, rotary position embeddings) per batch."""
        store, mask = [], [None]

        def stop(_module, args, kwargs):
            args = tuple(None if type(a).__name__.endswith("Cache") else a for a in args)  # GPT-2: positional
            store.append(Carried(args, without_cache(kwargs), mask[0]))
            raise _Captured

        device = next(self.model.parameters()).device
        hook = self.blocks[0][1].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with evaluating(self.model), parametrize.cached():
                for batch in self.batches():
                    mask[0] = gptq.batch_mask(batch)
                    try:
                        self.forward(self.model, to_device(batch, device))
                    except _Captured:
                        pass
        finally:
            hook.remove()
        self.carried, self.at = store, 0

    @torch.no_grad()
    def advance(self) -> None:
        """Run the (now compressed) current block on the carried inputs; its outputs become the carried inputs."""
        block = self.blocks[self.at][1]
        with evaluating(self.model), parametrize.cached():
            for c in self.carried:
                out = block(*c.args, **c.kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                held = c.args[0] if c.args else c.kwargs["hidden_states"]
                out = out.to(held.dtype)  # a bf16 model computing in float32 (lwpipe.compute) carries bf16
                if c.args:
                    c.args = (out, *c.args[1:])
                else:
                    c.kwargs["hidden_states"] = out
        self.at += 1
        release_freed_memory()


def without_cache(kwargs: dict) -> dict:
    """A block's keyword inputs without a key/value cache: re-running the block must not grow one."""
    out = dict(kwargs)
    for key, value in kwargs.items():  # transformers' Cache objects, whatever the keyword (cache, past_key_values)
        if key in ("cache", "past_key_value", "past_key_values", "layer_past") or type(value).__name__.endswith(
            "Cache"
        ):
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


class evaluating:
    """Eval mode inside, the model's training flag restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def calibration_batches(ctx, settings, batch_size: int) -> Callable[[], Iterable]:
    """A maker of the calibration batches: `settings.samples` examples of the training set (seeded shuffle)
    in batches of `batch_size`, each text cut to `settings.seq_len` tokens."""
    n = math.ceil(settings.samples / batch_size)
    return lambda: limited(ctx.calibration_batches(n, batch_size=batch_size), settings.samples, settings.seq_len)
