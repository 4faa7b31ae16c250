"""The channel dependency graph of structured pruning (lwpipe/structured.py): the model traced with torch.fx
(shapes from one example batch), its tensors' channel dimensions grouped with a union-find:

    Linear / Conv (groups=1)   output: a new channel space it *produces*; input: it *consumes* its input's space
    BatchNorm                  keeps the space (and is sliced with it)
    relu, pooling, dropout...  keep the space
    a + b (same shapes)        merges the spaces of a and b (residual additions stay aligned)
    flatten(1)                 keeps the space, each channel now spans H*W features of the next Linear
    anything else, the input and the output: the space is *blocked* (never pruned)
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.utils import parametrize

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


class _Spaces:
    """While walking the traced graph: each node's channel space (id in the union-find, features per channel)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.g = Graph()
        self.space: dict[fx.Node, tuple[int, int] | None] = {}

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.space]

    def block_inputs(self, node: fx.Node) -> None:
        for a in self.inputs(node):
            self.g.group(self.space[a][0]).blocked = True

    def blocked(self, node: fx.Node) -> None:
        """The node's inputs are blocked, and it starts a blocked space of its own."""
        self.block_inputs(node)
        self.space[node] = (self.g.new(blocked=True), 1)

    def call_module(self, node: fx.Node) -> None:
        g, m = self.g, self.modules[node.target]
        src = self.space.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(m, LAYERS) and getattr(m, "groups", 1) == 1 and src is not None:
            if src[1] != 1 and not isinstance(m, nn.Linear):
                g.group(src[0]).blocked = True
            g.group(src[0]).consumers.append((node.target, src[1]))
            self.space[node] = (g.new(), 1)
            g.group(self.space[node][0]).producers.append(node.target)
        elif isinstance(m, NORMS) and src is not None and src[1] == 1:
            g.group(src[0]).norms.append(node.target)
            self.space[node] = src
        elif isinstance(m, SAME_MODULES) and src is not None:
            self.space[node] = src
        elif isinstance(m, nn.Flatten) and src is not None and m.start_dim == 1 and m.end_dim == -1:
            self.space[node] = (src[0], src[1] * math.prod(_shape(node.args[0])[2:]))
        elif self.inputs(node) or _shape(node) is not None:
            self.blocked(node)

    def call_function(self, node: fx.Node) -> None:
        ins = self.inputs(node)
        if not ins:
            if _shape(node) is not None:
                self.space[node] = (self.g.new(blocked=True), 1)
            return
        first = self.space[ins[0]]
        if node.target in SAME_FUNCTIONS or node.target in SAME_METHODS:
            self.space[node] = first if isinstance(node.args[0], fx.Node) and node.args[0] in self.space else None
            if self.space[node] is None:
                self.blocked(node)
        elif (
            node.target in MERGE
            and all(_shape(a) == _shape(node) for a in ins)
            and len({self.space[a][1] for a in ins}) == 1
        ):
            root = first[0]
            for a in ins[1:]:
                root = self.g.union(root, self.space[a][0])
            self.space[node] = (root, first[1])
        elif (node.target in (torch.flatten, "flatten") and _flatten_from_1(node)) or (
            node.target in ("view", "reshape")
            and _shape(node) is not None
            and len(_shape(node)) == 2
            and _shape(ins[0])[0] == _shape(node)[0]
        ):
            self.space[node] = (first[0], first[1] * math.prod(_shape(ins[0])[2:]))
        elif _shape(node) is None and node.target in (getattr, "size", "dim"):
            return  # shape queries: no tensor comes out
        else:
            self.blocked(node)


def channel_groups(model: nn.Module, example: torch.Tensor) -> list[Group]:
    """The prunable channel groups of `model` (untraceable: Untraceable)."""
    gm = trace(model)
    was_training = model.training
    model.eval()
    with torch.no_grad(), parametrize.cached():
        ShapeProp(gm).propagate(example)
    model.train(was_training)
    walk = _Spaces(dict(model.named_modules()))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            walk.space[node] = (walk.g.new(blocked=True), 1)
        elif node.op == "output":
            walk.block_inputs(node)
        elif node.op == "call_module":
            walk.call_module(node)
        elif node.op in ("call_function", "call_method"):
            walk.call_function(node)
    return [grp for grp in walk.g.roots() if grp.producers and not grp.blocked]


def _shape(node: fx.Node) -> tuple | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flatten_from_1(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1
