"""Deployable forms: baked plain weights, real int8 kernels, sparse kernels (the `export` stage uses them).

The quantize stage trains with *simulated* quantization (fake-quant on float
weights) for accuracy and size; it runs no faster. `to_int8` gives a module
whose Linear/Conv layers run torch.ao's x86 (fbgemm) int8 kernels, with
activation ranges calibrated on data you pass. `benchmarks/bench_int8.py`
times it against fp32.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from lwpipe.constraints import effective_tensors


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

    gm = fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.modules.batchnorm._BatchNorm):
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1 \
                    and isinstance(mods[src.target], (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
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
        factors[conv_name] = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1 / torch.sqrt(bn.running_var + bn.eps)
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
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
    from lwpipe.constraints import compressible_layers, constraint

    out = {}
    for name, m in compressible_layers(model):
        c = constraint(m)
        if c is None or not c.quantized:
            continue
        if c.qmin < -128 or c.qmax > 127 or bool((c.zero_point != 0).any()):
            raise ValueError(f"{name}: levels {c.qmin}..{c.qmax} with zero point do not fit int8; "
                             f"quantize with scheme=symmetric and bits<=8")
        w = m.weight.detach()
        scale = c.scale.reshape(-1).float()
        scale = scale.expand(w.shape[0]) if scale.numel() == 1 else scale
        levels = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1)))
        out[name] = (levels.to(torch.int8), scale.clone())
    return out


def _qweight(levels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    sign = torch.where(scale < 0, -1, 1).to(torch.int8)  # a folded BN with negative gamma flips the levels
    levels = levels * sign.view(-1, *[1] * (levels.dim() - 1))
    return torch._make_per_channel_quantized_tensor(levels, scale.abs().double(),
                                                    torch.zeros(len(scale), dtype=torch.long), 0)


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
    from torch.ao.nn.quantized import dynamic as nnqd

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
            d = nnqd.Linear(m.in_features, m.out_features, dtype=torch.qint8)
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


class SparseLinear(nn.Module):
    """y = x W^T + b with W in CSR for batches of at least `min_batch` rows, dense below: at batch 1 a
    sparse kernel's setup costs more than it saves (README: crossover). CSR is rebuilt from its three
    buffers on each call (cheap; TorchScript saves plain buffers, not every sparse layout)."""

    def __init__(self, linear, min_batch=16):  # no annotations: TorchScript would try to resolve them
        super().__init__()
        w = linear.weight.detach()
        csr = w.to_sparse_csr()
        self.register_buffer("weight", w.clone())
        self.register_buffer("crow", csr.crow_indices())
        self.register_buffer("col", csr.col_indices())
        self.register_buffer("values", csr.values())
        b = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias", b.clone())
        self.size = [linear.out_features, linear.in_features]
        self.min_batch = min_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.size[1])
        if flat.shape[0] < self.min_batch:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        w = torch.sparse_csr_tensor(self.crow, self.col, self.values, self.size)
        out = torch.addmm(self.bias.unsqueeze(1), w, flat.t()).t()
        return out.reshape(x.shape[:-1] + (self.size[0],))


def sparse_form(model: nn.Module, min_sparsity: float, min_batch: int = 16) -> tuple[nn.Module, list[str]]:
    """The dense form, with every Linear at least `min_sparsity` sparse running a CSR kernel (from
    `min_batch` rows up). Its sparse layers are scripted, so the batch test survives tracing."""
    plain = dense_form(model)
    mods = dict(plain.named_modules())
    chosen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        for name, m in list(mods.items()):
            if isinstance(m, nn.Linear) and float((m.weight == 0).float().mean()) >= min_sparsity:
                parent, _, attr = name.rpartition(".")
                setattr(mods[parent] if parent else plain, attr, torch.jit.script(SparseLinear(m, min_batch)))
                chosen.append(name)
    return plain.eval(), chosen


def save_form(form: nn.Module, example: torch.Tensor, path) -> None:
    """torch.export (.pt2) for plain float graphs; TorchScript (.pt) where export cannot (int8 packed
    weights, sparse tensors). Either loads with torch alone: torch.export.load(p).module() / torch.jit.load(p)."""
    from pathlib import Path

    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if path.suffix == ".pt2":
            batch = {0: torch.export.Dim.AUTO}  # any batch size, not just the example's
            torch.export.save(torch.export.export(form, (example,), dynamic_shapes=(batch,)), str(path))
        else:
            torch.jit.save(torch.jit.trace(form, (example,), check_trace=False), str(path))


def load_form(path) -> nn.Module:
    from pathlib import Path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if Path(path).suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path)).eval()
