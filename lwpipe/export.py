"""Deployable forms: baked plain weights, real int8 kernels, sparse kernels (the `export` stage uses them).

The quantize stage trains with *simulated* quantization (fake-quant on float
weights) for accuracy and size; it runs no faster. `to_int8` gives a module
whose Linear/Conv layers run torch.ao's x86 (fbgemm) int8 kernels, with
activation ranges calibrated on data you pass. `benchmarks/bench_int8.py`
times it against fp32.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import nn

from lwpipe.constraints import effective_tensors
from lwpipe.export_io import PlainOutput, call_args, load_form, own_copy, save_form  # noqa: F401  (re-exported)


def bake(compressed: nn.Module, plain: nn.Module) -> nn.Module:
    """Load the weights `compressed` computes with (masks, codebooks, grids applied) into
    `plain`, a fresh instance of the same architecture without constraints."""
    plain.load_state_dict(effective_tensors(compressed))
    return plain.eval()


def to_int8(plain: nn.Module, calibration: torch.Tensor, engine: str = "x86") -> nn.Module:
    """A real int8 copy of `plain` (no constraints attached: see `bake`), calibrated on `calibration`.

    Uses torch.ao's FX graph mode, the path that converts whole models on CPU;
    torch marks it deprecated in favour of torchao's pt2e flow, and its
    warnings are silenced here on purpose.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    model = copy.deepcopy(plain).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping(engine), (calibration[:1],))
        with torch.no_grad():
            prepared(calibration)  # static activation ranges
        return convert_fx(prepared)


# -- deployable forms for the `export` stage (lwpipe/stages/export.py) ---------------------------------
def plain_copy(model: nn.Module) -> nn.Module:
    """A copy with every constraint baked into an ordinary tensor (no fresh instance needed)."""
    from torch.nn.utils import parametrize

    from lwpipe.constraints import clone

    out = clone(model).eval()
    for m in out.modules():
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BatchNorm reads only that convolution's output."""
    from torch import fx

    mods = dict(model.named_modules())
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods.values()):
        return []
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # an untraceable model keeps its BatchNorms: unfolded, still exact
        return []
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.modules.batchnorm._BatchNorm):
            src = node.args[0]
            if (
                isinstance(src, fx.Node)
                and src.op == "call_module"
                and len(src.users) == 1
                and isinstance(mods[src.target], (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            ):
                pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold each BatchNorm into the convolution before it (in place; the BN becomes Identity).
    Returns conv name -> the per-output-channel factor its weight was multiplied by."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    mods = dict(model.named_modules())
    factors = {}
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = mods[conv_name], mods[bn_name]
        factors[conv_name] = (
            bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        )
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
        parent, _, attr = bn_name.rpartition(".")
        setattr(mods[parent] if parent else model, attr, nn.Identity())
    return factors


def dense_form(model: nn.Module) -> nn.Module:
    """Constraints baked into plain weights, BatchNorm folded into the preceding convolution."""
    plain = plain_copy(model)
    fold_batchnorm(plain)
    return plain


@torch.no_grad()
def weight_levels(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (int8 levels, per-output-channel scale) from the quantize stage's own grid: the
    effective weight is exactly levels x scale, so no second rounding happens here."""
    from lwpipe.constraints import compressible_layers, constraint, grid_axis

    out = {}
    for name, m in compressible_layers(model):
        c = constraint(m)
        if c is None or not c.quantized:
            continue
        if c.group is not None:
            raise ValueError(
                f"{name}: per-group scales (group_size {c.group}) have no int8 per-channel form; "
                f"export format=dense, or quantize without group_size"
            )
        if c.qmin < -128 or c.qmax > 127 or bool((c.zero_point != 0).any()):
            raise ValueError(
                f"{name}: levels {c.qmin}..{c.qmax} with zero point do not fit int8; "
                f"quantize with scheme=symmetric and bits<=8"
            )
        w = m.weight.detach()
        levels = torch.round(w / c.scale.float())  # the scale has the grid's shape: it broadcasts along its axis
        channels = w.shape[grid_axis(m, True)]  # the output channels, wherever the layer type keeps them
        out[name] = (levels.to(torch.int8), c.scale.reshape(-1).float().expand(channels).clone())
    return out


def _qweight(levels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    sign = torch.where(scale < 0, -1, 1).to(torch.int8)  # a folded BN with negative gamma flips the levels
    levels = levels * sign.view(-1, *[1] * (levels.dim() - 1))
    return torch._make_per_channel_quantized_tensor(
        levels, scale.abs().double(), torch.zeros(len(scale), dtype=torch.long), 0
    )


FULL_RANGE_LEVEL = 64  # |level| <= 64: a pair of u8 x s8 products fits int16 (255 * 128 < 32768)


@functools.cache
def _dynamic_linear():
    """torch.ao's dynamic int8 Linear, with 8-bit activations where the layer's levels allow them.

    x86's AVX2 int8 kernel adds pairs of uint8 x int8 products in int16, which saturates for large
    weights, so torch.ao quantizes activations to 7 bits everywhere (reduce_range). A layer whose
    levels stay within +-64 cannot saturate, and keeps the 8th bit: on all-MiniLM-L6-v2 after
    recipe=sentence_embedding_minilm, the file's cosine to the quantized model it runs 0.976 instead of
    0.965 (0.959 to the uncompressed model; README, benchmarks/bench_speed.py)."""
    from torch.ao.nn.quantized import dynamic as nnqd

    class DynamicLinear(nnqd.Linear):
        reduce_range = True

        def forward(self, x):
            y = torch.ops.quantized.linear_dynamic(
                x, self._packed_params._packed_params, reduce_range=self.reduce_range
            )
            return y.to(x.dtype)

    return DynamicLinear


def int8_form(model: nn.Module, calibration: torch.Tensor, activations: str, engine: str = "x86") -> nn.Module:
    with warnings.catch_warnings():  # torch 2.13 marks torch.ao's quantized tensors deprecated; they still run
        warnings.simplefilter("ignore")
        return _int8_form(model, calibration, activations, engine)


def _int8_form(model: nn.Module, calibration: torch.Tensor, activations: str, engine: str) -> nn.Module:
    """Real int8 kernels on the quantize stage's integer levels.

    dynamic: every quantized Linear becomes torch.ao's dynamic int8 Linear (activations quantized per
    batch at run time); static: the whole graph runs quantized (torch.ao FX, activation ranges from
    `calibration`), BatchNorm folded into the convolution's per-channel scales. Layers the quantize
    stage left in float are quantized by torch.ao itself (static) or stay float (dynamic)."""
    levels = weight_levels(model)
    plain = plain_copy(model)
    factors = fold_batchnorm(plain)
    torch.backends.quantized.engine = engine
    mods = dict(plain.named_modules())
    if activations == "dynamic":
        for name, (q, s) in levels.items():
            m = mods[name]
            if not isinstance(m, nn.Linear):
                continue
            d = _dynamic_linear()(m.in_features, m.out_features, dtype=torch.qint8)
            d.reduce_range = bool(q.abs().max() > FULL_RANGE_LEVEL)
            d.set_weight_bias(_qweight(q, s), None if m.bias is None else m.bias.detach().float())
            parent, _, attr = name.rpartition(".")
            setattr(mods[parent] if parent else plain, attr, d)
        return plain.eval()
    converted = to_int8(plain, calibration, engine)
    qmods = dict(converted.named_modules())
    for name, (q, s) in levels.items():
        qm = qmods.get(name)
        if qm is None or not hasattr(qm, "set_weight_bias"):
            continue
        scale = s * factors[name] if name in factors else s
        bias = mods[name].bias.detach() if mods[name].bias is not None else None
        qm.set_weight_bias(_qweight(q, scale.float()), bias)
    return converted


class SparseLayer(nn.Module):
    """One Linear (+ the elementwise activation after it) of a `SparseChain`, weight in CSR when `sparse`."""

    def __init__(self, linear, act, sparse):  # no annotations: TorchScript would try to resolve them
        super().__init__()
        w = linear.weight.detach()
        csr = w.to_sparse_csr() if sparse else w[:1, :1].to_sparse_csr()  # unused placeholder when dense
        self.register_buffer("weight", w.clone())
        self.register_buffer("crow", csr.crow_indices().int())  # int32: MKL's own index type, no conversion
        self.register_buffer("col", csr.col_indices().int())
        self.register_buffer("values", csr.values())
        b = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias", b.clone())
        self.size = [linear.out_features, linear.in_features]
        self.sparse = sparse
        self.act = act

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, in) -> (batch, out), dense: small batches."""
        return self.act(torch.nn.functional.linear(x, self.weight, self.bias))

    def cols(self, h: torch.Tensor) -> torch.Tensor:
        """(in, batch) -> (out, batch): W @ h, the layout a CSR kernel streams best."""
        if self.sparse:
            w = torch.sparse_csr_tensor(
                self.crow, self.col, self.values, self.size, device=self.values.device
            )  # TorchScript would default to the CPU
            return self.act(torch.addmm(self.bias.unsqueeze(1), w, h))
        return self.act(torch.addmm(self.bias.unsqueeze(1), self.weight, h))


class SparseChain(nn.Module):
    """Consecutive Linear layers (elementwise activations between them) run on transposed activations.

    From `min_batch` rows up the input is transposed once, each layer computes W @ h with W in CSR
    (dense W for layers below the sparsity threshold), and the result is transposed back once:
    CSR x dense is fastest with the dense operand column-major, and transposing between every
    layer cost a third of the time (benchmarks/bench_speed.py). Below `min_batch` rows every
    layer runs dense: a sparse kernel's setup costs more than it saves (README: crossover). The CSR
    tensor is rebuilt from its three buffers on each call (cheap; TorchScript saves plain buffers,
    not every sparse layout)."""

    def __init__(self, linears, acts, sparse, min_batch=16):
        super().__init__()
        self.layers = nn.ModuleList([SparseLayer(lin, act, sp) for lin, act, sp in zip(linears, acts, sparse)])
        self.in_features = linears[0].in_features
        self.out_features = linears[-1].out_features
        self.min_batch = min_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = list(x.shape[:-1])  # a list in eager mode too (TorchScript makes it one)
        h = x.reshape(-1, self.in_features)
        if h.shape[0] < self.min_batch:
            for layer in self.layers:
                h = layer.rows(h)
            return h.reshape(lead + [self.out_features])
        h = h.t().contiguous()
        for layer in self.layers:
            h = layer.cols(h)
        return h.t().reshape(lead + [self.out_features])


def SparseLinear(linear: nn.Linear, min_batch: int = 16) -> SparseChain:
    """One Linear in CSR: a chain of one."""
    return SparseChain([linear], [nn.Identity()], [True], min_batch)


_ACT_MODULES = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Identity, nn.Dropout)


def _activation(node, mods) -> nn.Module | None:
    """The eval-mode module for an elementwise activation node (fx), or None if it is not one."""
    import torch.nn.functional as F

    if node.op == "call_module" and isinstance(mods[node.target], _ACT_MODULES):
        m = mods[node.target]
        return nn.Identity() if isinstance(m, (nn.Dropout, nn.Identity)) else copy.deepcopy(m)
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "call_function" and len(node.args) == 1:
        simple = {
            F.relu: nn.ReLU,
            torch.relu: nn.ReLU,
            torch.tanh: nn.Tanh,
            torch.sigmoid: nn.Sigmoid,
            F.silu: nn.SiLU,
            F.gelu: nn.GELU,
        }
        if node.target in simple and set(kwargs) <= ({"approximate"} if node.target is F.gelu else set()):
            return simple[node.target](**kwargs)
    if node.op == "call_method" and node.target in ("relu", "tanh", "sigmoid") and len(node.args) == 1 and not kwargs:
        return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[node.target]()
    return None


def _chains(gm, mods) -> list[list]:
    """Runs of Linear call nodes joined only through single-use elementwise activations:
    [(linear node, activation node or None, its module or None), ...]."""

    def linear(n):
        return n.op == "call_module" and isinstance(mods.get(n.target), nn.Linear) and len(n.args) == 1 and not n.kwargs

    seen, chains = set(), []
    for node in gm.graph.nodes:
        if not linear(node) or node in seen:
            continue
        chain, cur = [], node
        while True:
            seen.add(cur)
            nxt = next(iter(cur.users)) if len(cur.users) == 1 else None
            module = _activation(nxt, mods) if nxt is not None else None
            after = nxt if module is not None else cur
            step = next(iter(after.users)) if len(after.users) == 1 else None
            if step is not None and linear(step) and step.args[0] is after and step not in seen:
                chain.append((cur, after if module is not None else None, module))
                cur = step
                continue
            chain.append((cur, None, None))
            break
        chains.append(chain)
    return chains


def sparse_form(model: nn.Module, min_sparsity: float, min_batch: int = 16) -> tuple[nn.Module, list[str]]:
    """The dense form, with every run of Linear layers that holds one at least `min_sparsity` sparse
    fused into a scripted `SparseChain` (CSR for the sparse layers, transposed activations inside).
    Models torch.fx cannot trace get one chain per sparse layer. Returns (form, sparse layer names)."""
    from torch import fx

    plain = dense_form(model)
    mods = dict(plain.named_modules())
    sparse = {
        n for n, m in mods.items() if isinstance(m, nn.Linear) and float((m.weight == 0).float().mean()) >= min_sparsity
    }
    if not sparse:
        return plain.eval(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        try:
            gm = fx.symbolic_trace(plain)
        except Exception:  # untraceable: layer by layer, transposing around each sparse Linear
            for name in sorted(sparse):
                parent, _, attr = name.rpartition(".")
                setattr(mods[parent] if parent else plain, attr, torch.jit.script(SparseLinear(mods[name], min_batch)))
            return plain.eval(), sorted(sparse)
        for i, chain in enumerate(c for c in _chains(gm, mods) if any(n.target in sparse for n, _, _ in c)):
            names = [n.target for n, _, _ in chain]
            acts = [module if module is not None else nn.Identity() for _, _, module in chain]
            fused = SparseChain([mods[n] for n in names], acts, [n in sparse for n in names], min_batch)
            gm.add_submodule(f"sparse_chain{i}", torch.jit.script(fused))
            first, last = chain[0][0], chain[-1][0]
            with gm.graph.inserting_after(last):
                new = gm.graph.call_module(f"sparse_chain{i}", (first.args[0],))
            last.replace_all_uses_with(new)
            for n, a, _ in reversed(chain):
                for dead in (a, n):
                    if dead is not None:
                        gm.graph.erase_node(dead)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return gm.eval(), sorted(sparse)
