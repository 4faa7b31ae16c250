"""GPTQ: choose a layer's grid levels to minimise its output error on calibration data.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". For a layer y = W x, rounding W to a grid adds the error ||(W - Q) X||^2 over the
calibration inputs X. With H = 2 X X^T (the layer's input Hessian), GPTQ quantizes one input column
at a time and spreads that column's rounding error over the columns not yet quantized, weighted by
H^-1 (the Optimal Brain Surgeon update), in blocks of `block` columns with lazy updates of the rest.
The grid itself (scale, zero point, qmin..qmax) is fixed beforehand, so the levels GPTQ picks are the
quantize stage's ordinary grid levels: masks, the artifact and export see nothing new.

`input_hessians` gathers H for many layers in one pass with forward hooks (float32 sums, whatever
the model's dtype); `gptq_weight` is the algorithm on one weight matrix, a pure function.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lwpipe.calibration import Forward, default_forward, gather_inputs
from lwpipe.constraints import is_hf_conv1d
from lwpipe.errors import LwpipeError


class HessianError(LwpipeError):
    """H + damping is not positive definite: names the layer and the damping that might help."""


def supports(module: nn.Module) -> bool:
    """Layers whose output is W times an input vector GPTQ can gather: Linear, transformers' Conv1D and
    ungrouped Conv2d (its inputs as unfolded patches). Embeddings have no input activation."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def as_rows(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """The weight as [outputs, inputs] (Conv1D stores [in, out]; a conv's inputs are in x kh x kw)."""
    if is_hf_conv1d(module):
        return w.t()
    return w.reshape(w.shape[0], -1)


def from_rows(module: nn.Module, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return rows.t().contiguous() if is_hf_conv1d(module) else rows.reshape(shape)


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as [tokens, inputs], in the order of as_rows' columns."""
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


class HessianSums:
    """Running H = 2/n X^T X per layer, in float32 whatever the model's dtype; `add` takes one input."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.last: tuple | None = None  # the last input and its product: q, k and v read one input

    def add(self, name: str, module: nn.Module, x: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """`real`: the batch's attention mask; positions it marks as padding are left out of inputs shaped
        [batch, tokens, features]. Layers reading the very same input tensor one after the other (a block's
        q, k and v projections, its gate and up projections) share one X^T X product."""
        last = self.last  # (input tensor, its version, mask, X^T X, rows, X^T X's version): the input is held,
        shared = (  # so its memory is not reused by another tensor meanwhile
            last is not None
            and not isinstance(module, nn.Conv2d)  # a convolution's columns depend on the layer
            and last[0] is x
            and last[1] == x._version
            and last[2] is real
            and last[3]._version == last[5]  # not summed into in place since
        )
        if shared:
            xtx, rows = last[3], last[4]
        else:
            source, x = x, x.detach()
            if real is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(real.shape):
                x = x[real.to(x.device)]
            cols = input_columns(module, x).float()
            xtx, rows = cols.t() @ cols, cols.shape[0]
            conv = isinstance(module, nn.Conv2d)
            self.last = None if conv else (source, source._version, real, xtx, rows, xtx._version)
        if name not in self.sums:  # the product itself while no other layer holds it (no copy)
            self.sums[name] = xtx.clone() if shared else xtx
        else:
            self.sums[name].add_(xtx)
        self.counts[name] = self.counts.get(name, 0) + rows

    def hook(self, name: str, module: nn.Module, mask: list):
        """A forward pre-hook (with kwargs) adding the layer's input; mask[0] is the current batch's mask."""

        def gather(_module, args, kwargs):
            self.add(name, module, args[0] if args else next(iter(kwargs.values())), mask[0])

        return gather

    def result(self) -> dict[str, torch.Tensor]:
        self.last = None
        return {n: s.mul_(2.0 / max(self.counts[n], 1)) for n, s in self.sums.items()}


def batch_mask(batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask.bool() if mask is not None else None


@torch.no_grad()
def input_hessians(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable, forward: Forward = default_forward
) -> tuple[dict[str, torch.Tensor], int]:
    """(name -> H = 2/n X^T X over every calibration token, number of batches seen), in float32. Positions
    a dict batch's attention_mask marks as padding are left out of layers that see [batch, tokens, features].

    One [inputs x inputs] matrix per layer is alive at a time of the pass: memory is the layers'
    Hessians plus one batch's activations."""
    sums, mask = HessianSums(), [None]

    def note_mask(batch) -> None:
        mask[0] = batch_mask(batch)

    seen = gather_inputs(model, layers, lambda n, m: sums.hook(n, m, mask), batches, forward, note_mask)
    return sums.result(), seen


def inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, as GPTQ's reference computes it."""
    h = h.clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError:
        raise HessianError(
            f"layer {name}: its input Hessian plus damping {damp:g} x its mean diagonal is not "
            f"positive definite; raise damp (for example to {min(1.0, damp * 10):g}) or give more "
            f"calibration samples"
        ) from None


@torch.no_grad()
def gptq_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    mask: torch.Tensor | None = None,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    name: str = "",
    group: int | None = None,
    regrid=None,
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """(levels q [rows, cols], summed weighted squared error, scale, zero point) for w [rows, cols] on the
    grid round(w / scale) + zero_point clamped to qmin..qmax.

    scale and zero_point are a scalar or one per row ([rows, 1]); with `group`, one per row and group of
    `group` consecutive columns ([rows, ceil(cols / group)]). `regrid(columns) -> (scale, zero_point)`
    recomputes a group's grid from its columns as GPTQ reaches them (already carrying the error of the
    columns before; not with act_order, whose groups keep the grid they were given). Weights the mask
    drops are level `zero_point` (value 0) and their error is compensated like any other. Columns
    whose input never fires (H_jj = 0) are quantized by rounding alone."""
    w, h, scale, zero_point, keep = prepared(w, h, scale, zero_point, mask, group)
    cols = w.shape[1]
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    if act_order:
        w, h, keep = w[:, order], h[order][:, order], keep[:, order]
    col_group = order // group if group is not None else torch.zeros(cols, dtype=torch.long)
    hinv = inverse_cholesky(h, damp, name)
    q = torch.zeros_like(w)
    grid = (scale, zero_point, qmin, qmax, col_group, group, None if act_order else regrid)
    loss = 0.0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err1, block_loss = quantize_block(w, hinv, q, keep, i1, i2, grid)
        loss += block_loss
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if act_order:
        q = q[:, torch.argsort(order)]
    return q, loss, scale, zero_point


def prepared(w, h, scale, zero_point, mask, group):
    """gptq_weight's float32 copies: scales as [rows, 1] (or [rows, groups]), the keep mask, and H with its
    dead inputs (H_jj = 0, never firing) given a unit diagonal so that they are rounded alone."""
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    if group is None:
        scale = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(1, 1)
        zero_point = zero_point.float().reshape(scale.shape)
    else:
        scale, zero_point = scale.float().clone(), zero_point.float().clone()
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return w, h, scale, zero_point, keep


def quantize_block(w, hinv, q, keep, i1: int, i2: int, grid) -> tuple[torch.Tensor, float]:
    """Columns i1..i2 of w, one at a time: each column's levels into q, its error spread over the block's
    later columns (w updated in place); returns the block's errors (for the lazy update of the columns after
    it) and its summed weighted squared error. `grid`: (scale, zero_point, qmin, qmax, col_group, group,
    regrid or None), scale and zero_point updated in place when regrid recomputes a group.

    The block is worked on transposed (each column a contiguous row) on one thread: its steps are thousands
    of small vector operations, which a second thread only slows (by ~10x on a loaded machine); the lazy
    update after the block, one matrix product, keeps every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _columns(w, hinv, q, keep, i1, i2, grid)
    finally:
        torch.set_num_threads(threads)


def _columns(w, hinv, q, keep, i1: int, i2: int, grid) -> tuple[torch.Tensor, float]:
    scale, zero_point, qmin, qmax, col_group, group, regrid = grid
    w1t, hinv1 = w[:, i1:i2].t().contiguous(), hinv[i1:i2, i1:i2]
    keep_t, err1t = keep[:, i1:i2].t(), torch.zeros_like(w1t)
    every = bool(keep_t.all())  # nothing masked: no select per column
    levels = torch.empty_like(w1t)
    groups = col_group[i1:i2].tolist()
    loss = torch.zeros((), dtype=torch.float64)
    scale_t = zero_t = None
    current = -1
    for i, g in enumerate(groups):
        j = i1 + i
        if regrid is not None and j % group == 0:
            ahead = torch.cat([w1t[i:].t(), w[:, i2:]], 1)[:, :group] * keep[:, j : j + group]
            scale[:, g : g + 1], zero_point[:, g : g + 1] = regrid(ahead)
            scale_t = None
        if scale_t is None or g != current:
            current, scale_t, zero_t = g, scale[:, g].contiguous(), zero_point[:, g].contiguous()
        col, d = w1t[i], hinv1[i, i]
        level = torch.div(col, scale_t).round_().add_(zero_t).clamp_(qmin, qmax)
        if not every:
            level = torch.where(keep_t[i], level, zero_t)
        levels[i] = level
        e = torch.sub(col, level.sub_(zero_t).mul_(scale_t)).div_(d)
        loss += torch.dot(e, e).double()
        if i + 1 < len(groups):
            w1t[i + 1 :].addr_(hinv1[i, i + 1 :], e, alpha=-1)
        err1t[i] = e
    q[:, i1:i2] = levels.t()
    return err1t.t(), float(loss) / 2


@torch.no_grad()
def sparsegpt_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    keep: torch.Tensor | None = None,
    block: int = 128,
    damp: float = 0.01,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructed weights, keep mask) for w [rows, cols]: SparseGPT (Frantar & Alistarh 2023).

    Within each block of `block` columns the weights with the lowest w^2 / [H^-1]_jj^2 are dropped
    (`sparsity` of the block, or with nm=(n, m) all but n of every m consecutive inputs of a row, scored
    when the loop reaches the group, on the weights the updates of the columns before it left), and
    each dropped weight's error is spread over the row's later columns by the same OBS update as GPTQ,
    so the kept weights absorb what the dropped ones did. Weights `keep` already drops stay dropped."""
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.to(torch.bool).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    hinv = inverse_cholesky(h, damp, name)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        drop = ~keep[:, i1:i2]
        if nm is None:  # the block's mask at once (an n:m group's when the loop reaches it)
            score = obs_score(w1, hinv1).masked_fill(drop, -1.0)  # already-dropped weights go first
            k = int(round(sparsity * score.numel()))
            if k:
                drop.view(-1)[torch.topk(score.view(-1), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # scored on the weights as the columns before left them
                g = slice(i, i + nm[1])
                group = obs_score(w1[:, g], hinv1[g, g]).masked_fill(drop[:, g], -1.0)
                n_drop = max(group.shape[1] - nm[0], 0)
                if n_drop:
                    drop[:, i : i + nm[1]].scatter_(1, torch.topk(group, n_drop, dim=1, largest=False).indices, True)
            col, d = w1[:, i], hinv1[i, i]
            q = torch.where(drop[:, i], torch.zeros_like(col), col)
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~drop
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w * keep, keep


def obs_score(w: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """SparseGPT's saliency of each weight of columns w: w^2 / [H^-1]_jj^2 (hinv: those columns' H^-1)."""
    return w**2 / torch.diag(hinv).reshape(1, -1) ** 2


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks: the longest nn.ModuleList of two or more modules of one class that hold
    layers GPTQ can take (a transformers model's `layers` / `h` / `encoder.layer`), by qualified name."""
    best: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(b) for b in m}) != 1:
            continue
        if not any(supports(x) for x in m[0].modules()):
            continue
        if len(m) > len(best):
            best = [(f"{name}.{i}" if name else str(i), b) for i, b in enumerate(m)]
    return best


def sequential_groups(layers: list[str], blocks: list[str]) -> list[list[str]]:
    """Layer names in the order GPTQ compresses them: those before the first block, then block by block, then the
    rest; each group's Hessians are gathered after the groups before it are compressed."""

    def block_of(name: str) -> int | None:
        return next((i for i, b in enumerate(blocks) if name == b or name.startswith(b + ".")), None)

    first = min((i for i, n in enumerate(layers) if block_of(n) is not None), default=len(layers))
    groups: list[list[str]] = [[n for n in layers[:first] if block_of(n) is None]]
    groups += [[n for n in layers if block_of(n) == i] for i in range(len(blocks))]
    groups.append([n for n in layers[first:] if block_of(n) is None])
    return [g for g in groups if g]
