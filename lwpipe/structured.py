"""Structured pruning that shrinks layers: `prune.granularity: structured`.

Removing output channel c of a convolution only makes the model smaller if c is
removed everywhere it flows: the BatchNorm after it, the input channels of the
layers that read it, and, through a residual addition, the same channel of
every other tensor added to it. As in Torch-Pruning's dependency graph
(Fang et al. 2023), the model is traced (torch.fx, with shapes from one example
batch) and its tensors' channel dimensions are grouped with a union-find:

    Linear / Conv (groups=1)   output: a new channel space it *produces*; input: it *consumes* its input's space
    BatchNorm                  keeps the space (and is sliced with it)
    relu, pooling, dropout...  keep the space
    a + b (same shapes)        merges the spaces of a and b (residual additions stay aligned)
    flatten(1)                 keeps the space, each channel now spans H*W features of the next Linear
    anything else, the input and the output: the space is *blocked* (never pruned)

Each unblocked group with producers loses its lowest-scoring channels (summed
per-producer-normalised L2 norms of the output rows, or Taylor scores), and every
producer, BatchNorm and consumer gets smaller tensors: a smaller dense model.
`resize_to` rebuilds such shapes in a freshly built model (lwpipe.load, checkpoints).
"""

from __future__ import annotations

import logging
import math
import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.utils import parametrize

from lwpipe.bn import recalibrate_bn
from lwpipe.errors import ConfigError

log = logging.getLogger("lwpipe")

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SAME_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
SAME_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.hardswish,
}
SAME_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach"}
MERGE = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.mul,
    torch.add,
    torch.sub,
    torch.mul,
    "add",
    "add_",
    "sub",
    "mul",
}


class Untraceable(Exception):
    def __init__(self, module: str, why: str):
        super().__init__(f"{module}: {why}")
        self.module, self.why = module, why


# -- tracing -------------------------------------------------------------------------------------
def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx graph of the model; Untraceable names the innermost module that does not trace."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        culprit = type(model).__name__
        for name, m in model.named_modules():  # the deepest submodule that fails on its own
            if name and not isinstance(m, LAYERS + NORMS + SAME_MODULES) and not _traces(m):
                culprit = f"{name} ({type(m).__name__})"
        raise Untraceable(culprit, first) from None


def traceable(model: nn.Module) -> bool:
    return _traces(model)


def _traces(m: nn.Module) -> bool:
    try:
        fx.symbolic_trace(m)
        return True
    except Exception:
        return False


class Group:
    """Tensors that share one channel dimension: who makes it, who reads it, what is sliced with it."""

    def __init__(self):
        self.producers: list[str] = []
        self.consumers: list[tuple[str, int]] = []  # (module, features per channel)
        self.norms: list[str] = []
        self.blocked = False


class Graph:
    def __init__(self):
        self.parent: list[int] = []
        self.groups: list[Group] = []

    def new(self, blocked: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(Group())
        self.groups[-1].blocked = blocked
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            g, h = self.groups[a], self.groups[b]
            g.producers += h.producers
            g.consumers += h.consumers
            g.norms += h.norms
            g.blocked |= h.blocked
        return a

    def group(self, i: int) -> Group:
        return self.groups[self.find(i)]

    def roots(self) -> list[Group]:
        return [self.groups[i] for i in range(len(self.parent)) if self.find(i) == i]


def channel_groups(model: nn.Module, example: torch.Tensor) -> list[Group]:
    """The prunable channel groups of `model` (untraceable: Untraceable)."""
    gm = trace(model)
    was_training = model.training
    model.eval()
    with torch.no_grad(), parametrize.cached():
        ShapeProp(gm).propagate(example)
    model.train(was_training)
    modules = dict(model.named_modules())
    g = Graph()
    space: dict[fx.Node, tuple[int, int]] = {}  # node -> (space id, features per channel)

    def shape(node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tensor_inputs(node):
        return [a for a in node.all_input_nodes if a in space]

    def block_inputs(node):
        for a in tensor_inputs(node):
            g.group(space[a][0]).blocked = True

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            space[node] = (g.new(blocked=True), 1)
        elif node.op == "output":
            block_inputs(node)
        elif node.op == "call_module":
            m = modules[node.target]
            src = space.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(m, LAYERS) and getattr(m, "groups", 1) == 1 and src is not None:
                if src[1] != 1 and not isinstance(m, nn.Linear):
                    g.group(src[0]).blocked = True
                g.group(src[0]).consumers.append((node.target, src[1]))
                space[node] = (g.new(), 1)
                g.group(space[node][0]).producers.append(node.target)
            elif isinstance(m, NORMS) and src is not None and src[1] == 1:
                g.group(src[0]).norms.append(node.target)
                space[node] = src
            elif isinstance(m, SAME_MODULES) and src is not None:
                space[node] = src
            elif isinstance(m, nn.Flatten) and src is not None and m.start_dim == 1 and m.end_dim == -1:
                space[node] = (src[0], src[1] * math.prod(shape(node.args[0])[2:]))
            elif tensor_inputs(node) or shape(node) is not None:
                block_inputs(node)
                space[node] = (g.new(blocked=True), 1)
        elif node.op in ("call_function", "call_method"):
            ins = tensor_inputs(node)
            if not ins:
                if shape(node) is not None:
                    space[node] = (g.new(blocked=True), 1)
                continue
            first = space[ins[0]]
            if node.target in SAME_FUNCTIONS or node.target in SAME_METHODS:
                space[node] = first if isinstance(node.args[0], fx.Node) and node.args[0] in space else None
                if space[node] is None:
                    block_inputs(node)
                    space[node] = (g.new(blocked=True), 1)
            elif (
                node.target in MERGE
                and all(shape(a) == shape(node) for a in ins)
                and len({space[a][1] for a in ins}) == 1
            ):
                root = first[0]
                for a in ins[1:]:
                    root = g.union(root, space[a][0])
                space[node] = (root, first[1])
            elif node.target in (torch.flatten, "flatten") and _flatten_from_1(node):
                space[node] = (first[0], first[1] * math.prod(shape(ins[0])[2:]))
            elif (
                node.target in ("view", "reshape")
                and shape(node) is not None
                and len(shape(node)) == 2
                and shape(ins[0])[0] == shape(node)[0]
            ):
                space[node] = (first[0], first[1] * math.prod(shape(ins[0])[2:]))
            elif shape(node) is None and node.target in (getattr, "size", "dim"):
                continue  # shape queries: no tensor comes out
            else:
                block_inputs(node)
                space[node] = (g.new(blocked=True), 1)
    return [grp for grp in g.roots() if grp.producers and not grp.blocked]


def _flatten_from_1(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


# -- shrinking -----------------------------------------------------------------------------------
def _replace(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(m, name)
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        m.register_buffer(name, value.detach().clone())


def _bake(m: nn.Module):
    """Plain weights for slicing; returns the old mask (or None) to put back, sliced."""
    from lwpipe.constraints import constraint

    c = constraint(m)
    if c is None:
        return None
    if c.shared or c.quantized:
        raise ValueError("a shared or quantized layer cannot be shrunk; prune structurally before share/quantize")
    mask = c.mask
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return mask


def _remask(m: nn.Module, mask) -> None:
    if mask is not None:
        from lwpipe.constraints import ensure_constraint

        ensure_constraint(m).set_mask(mask)


@torch.no_grad()
def shrink(model: nn.Module, group: Group, keep: torch.Tensor) -> None:
    """Keep only channels `keep` of the group in every tensor that carries them."""
    modules = dict(model.named_modules())
    for name in group.producers:
        m = modules[name]
        mask = _bake(m)
        _replace(m, "weight", m.weight[keep])
        if m.bias is not None:
            _replace(m, "bias", m.bias[keep])
        _remask(m, None if mask is None else mask[keep])
        if isinstance(m, nn.Linear):
            m.out_features = len(keep)
        else:
            m.out_channels = len(keep)
    for name in group.norms:
        m = modules[name]
        for t in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, t, None) is not None:
                _replace(m, t, getattr(m, t)[keep])
        m.num_features = len(keep)
    for name, per in group.consumers:
        m = modules[name]
        idx = (keep[:, None] * per + torch.arange(per)).flatten()
        mask = _bake(m)
        _replace(m, "weight", m.weight[:, idx])
        _remask(m, None if mask is None else mask[:, idx])
        if isinstance(m, nn.Linear):
            m.in_features = len(idx)
        else:
            m.in_channels = len(idx)


def channel_scores(model: nn.Module, group: Group, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per channel: the producers' output-row L2 norms (or given scores), each producer normalised to mean 1."""
    modules = dict(model.named_modules())
    total = None
    for name in group.producers:
        w = weights[name] if weights is not None else modules[name].weight.detach()
        s = w.flatten(1).norm(dim=1) if weights is None else w.flatten(1).sum(1)
        s = s / s.mean().clamp_min(1e-12)
        total = s if total is None else total + s
    return total


def width(model: nn.Module, group: Group) -> int:
    m = dict(model.named_modules())[group.producers[0]]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    targets: dict[str, float],
    original: dict[str, int],
    scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Remove channels so that each group keeps (1 - target) of its original width (at least 1 channel).

    targets: producer layer -> fraction of its original output channels to remove (a layer left out is
    not pruned, nor is any group it produces into); original: producer -> width before the first step.
    Returns producer -> width now."""
    out = {}
    for group in channel_groups(model, example):
        if any(p not in targets for p in group.producers):
            continue
        frac = min(targets[p] for p in group.producers)
        n, n0 = width(model, group), original.get(group.producers[0], width(model, group))
        keep_n = max(1, n0 - int(round(frac * n0)))
        if keep_n < n:
            s = channel_scores(model, group, None if scores is None else {p: scores[p] for p in group.producers})
            keep = torch.sort(torch.argsort(s, descending=True, stable=True)[:keep_n]).values
            shrink(model, group, keep.to(s.device))
        for p in group.producers:
            out[p] = keep_n if keep_n < n else n
    return out


# -- the prune stage's structured path ----------------------------------------------------------
def run(stage, model: nn.Module, ctx) -> nn.Module:
    """Prune.run for granularity=structured: gradual or one-shot, fine-tuning after each step."""
    from lwpipe.constraints import compressible_layers, tied_layers
    from lwpipe.stages.prune import cubic_schedule, taylor_scores
    from lwpipe.training import fit

    cfg = stage.cfg
    example = ctx.test_loader()[0][0][:2].to(ctx.device)
    layers = dict(compressible_layers(model))
    finals = stage._targets(layers, tied_layers(model))
    original = {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels) for n, m in layers.items()}
    steps = cfg.steps if cfg.schedule == "gradual" else 1
    for t in range(1, steps + 1):
        targets = {n: cubic_schedule(0.0, finals[n], t, steps) for n in finals}
        scores = None
        if cfg.criterion == "taylor":
            mods = dict(compressible_layers(model))
            names = list(mods)
            with torch.enable_grad():
                raw = taylor_scores(
                    model, ctx.calibration_batches(cfg.calibration_batches), list(mods.values()), ctx.loss
                )
            scores = dict(zip(names, raw))
        elif cfg.criterion == "entropy":  # Luo & Wu 2017: the entropy of each channel's activations
            from lwpipe.calibration import task_forward
            from lwpipe.variational import channel_entropy

            scores = channel_entropy(
                model,
                dict(compressible_layers(model)),
                ctx.calibration_batches(cfg.calibration_batches),
                task_forward(ctx),
                cfg.bins,
            )
        widths = prune_channels(model, example, targets, original, scores)
        model.lwpipe_resized = True  # model.lwp says so (artifact/decode.build_model)
        recalibrate_bn(model, ctx.calibration_batches(cfg.calibration_batches))
        log.info(
            "  structured prune step %d/%d: channels kept %s",
            t,
            steps,
            ", ".join(f"{n}={w}/{original[n]}" for n, w in widths.items()),
        )
        fit(
            model,
            ctx.train_loader(cfg.finetune.batch_size),
            cfg.finetune,
            loss_fn=ctx.loss,
            hooks=ctx.hooks(model),
        )
    return model


def check(model: nn.Module, path: str, fallback: str) -> None:
    """Before any work: a model pruned structurally must trace (unless the recipe allows the mask fallback)."""
    try:
        trace(model)
    except Untraceable as e:
        if fallback != "mask":
            raise ConfigError(
                f"{path}.granularity",
                "structured",
                f"needs a model torch.fx can trace, and module {e.module} does not ({e.why}); "
                f"set {path}.untraceable=mask to mask whole rows instead of shrinking layers",
            ) from None
        log.warning("%s: module %s does not trace (%s): structured pruning masks rows instead", path, e.module, e.why)


# -- rebuilding smaller shapes -------------------------------------------------------------------
@torch.no_grad()
def resize_to(model: nn.Module, shapes: dict[str, tuple]) -> None:
    """Give a freshly built model the (smaller) layer shapes a structurally pruned model had, so that its
    stored tensors load. `shapes`: plain tensor name -> shape. Layers whose shapes match, or that would
    have to grow, are left alone (loading then reports the mismatch)."""
    for name, m in model.named_modules():
        if not isinstance(m, LAYERS + NORMS):
            continue
        prefix = f"{name}." if name else ""
        want = shapes.get(prefix + "weight", shapes.get(prefix + "running_mean"))
        have = tuple(m.weight.shape) if getattr(m, "weight", None) is not None else tuple(m.running_mean.shape)
        if want is None or tuple(want) == have or len(want) != len(have) or any(a > b for a, b in zip(want, have)):
            continue
        for t in ("weight", "bias", "running_mean", "running_var"):
            if parametrize.is_parametrized(m, t):
                parametrize.remove_parametrizations(m, t, leave_parametrized=False)
            old = getattr(m, t, None)
            if old is not None:
                _replace(m, t, torch.zeros(tuple(want) if t == "weight" else (want[0],), dtype=old.dtype))
        model.lwpipe_resized = True  # model.lwp then says so: only such a file may shrink its model's layers
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = want
        elif isinstance(m, NORMS):
            m.num_features = want[0]
        else:
            m.out_channels, m.in_channels = want[0], want[1] * m.groups
