"""llm-compressor's side of bench_gptq_lm.py, run with the Python of a venv that has llmcompressor.

    VENV/bin/python benchmarks/peer_llmcompressor_lm.py MODEL_DIR calib.txt test.txt OUT_DIR --max-length 64

Runs llm-compressor's `oneshot` on the GPT-2 in MODEL_DIR, calibrated on calib.txt (one row per text, truncated
to --max-length tokens; no padding, as lwpipe leaves padding out of its Hessians), with gptq_w4's settings as
far as llm-compressor has them: 4-bit symmetric weights (levels -8..7), groups of 128, static activation
order, damping 0.01 of the mean of diag(H), block by block (its sequential pipeline over GPT2Block); the
embeddings and the tied output head left alone. Each variant is saved DENSE under OUT_DIR/NAME (plain fp32
GPT2LMHeadModel weights, the levels times their scales, with the tokenizer) so that bench_gptq_lm.py can
measure it with lwpipe's own evaluator:
  rtn, rtn_mse             QuantizationModifier W4A16 (round to nearest), min-max / MSE observer
  gptq, gptq_mse           GPTQModifier W4A16, min-max / MSE observer (MSE: the nearest to lwpipe's clip_search)
  sparse24                 SparseGPTModifier, 2:4 (mask_structure "2:4", sparsity 0.5) alone
  sparse24_gptq(_mse)      SparseGPT 2:4, then GPTQ W4A16 on the pruned model: lwpipe's sparsegpt_24_w4 chain
                           (one oneshot; its independent pipeline gives each modifier its own block-by-block pass)
  sparse24_gptq_keep0      the same with the zero-keeping GPTQ llm-compressor had until its PR #2860 (2026-06):
                           0.14's GPTQ does not keep zeros (its error updates fill pruned weights in), so the
                           chain's output above is no longer 2:4; see `zeros_kept`
Prints one JSON line: per variant its seconds, the fraction of zero weights in the layers it compressed, the
fraction of groups of 4 inputs with at least two zeros, and the largest logit difference between
llm-compressor's own model and the dense copy on a few test texts (the copy is the model it computes).

GPT-2's layers are transformers' Conv1D (weight stored [in, out]), which llm-compressor's "Linear" targets do
not match; they are swapped for nn.Linear with the transposed weight (the same function) before oneshot and
copied back transposed after. The head is ignored as "re:.*lm_head": SparseGPTModifier names it "lm_head.",
so ignore=["lm_head"] let it prune the head (and the embeddings tied to it).
Kept apart from lwpipe's venv, since llmcompressor pins its own packages:
    python3 -m venv VENV && VENV/bin/pip install torch==2.13.0 && VENV/bin/pip install llmcompressor
(measured with llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import time
from pathlib import Path

import torch
from torch import nn

VARIANTS = (
    "rtn",
    "rtn_mse",
    "gptq",
    "gptq_mse",
    "sparse24",
    "sparse24_gptq",
    "sparse24_gptq_mse",
    "sparse24_gptq_keep0",
)


def to_linear(model: nn.Module) -> list[str]:
    """Swap every transformers Conv1D under model.transformer.h for an nn.Linear computing the same; their names."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.transformer.h.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.transformer.h.get_submodule(parent_name)
        conv = getattr(parent, child)
        lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            lin.bias.copy_(conv.bias)
        setattr(parent, child, lin)
    return names


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module's forward uses: fake-quantized with its own scales where it carries a scheme."""
    scheme = getattr(module, "quantization_scheme", None)
    w = module.weight.detach()
    if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
        return w.clone()
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    zp = getattr(module, "weight_zero_point", None)  # static activation order: groups in column order, no g_idx
    return fake_quantize(w, module.weight_scale, zp, scheme.weights).detach()


@contextlib.contextmanager
def zeros_kept():
    """llm-compressor's GPTQ, but weights that are zero when it starts stay zero and take no error updates, as in
    its (and sparseml's) GPTQ until PR #2860 removed it: W[:, i:] -= err * mask. Done without copying its
    kernel: the block update is wrapped to zero the masked weights before it runs, and GPTQModifier runs with
    block_size=1 (lazy batch updates only regroup GPTQ's arithmetic), so every column's update is masked."""
    import llmcompressor.modifiers.gptq.gptq_quantize as gq

    order, block, state = gq.apply_activation_ordering, gq.gptq_block_update, {}

    def ordered(w, h, actorder):
        keep = w != 0
        w, h, perm = order(w, h, actorder)
        state["keep"] = keep if perm is None else torch.gather(keep, -1, perm.unsqueeze(-2).expand_as(keep))
        return w, h, perm

    def masked(w1, *args, i1: int, **kwargs):
        w1.mul_(state["keep"][:, :, i1 : i1 + w1.shape[-1]].to(w1.dtype))
        return block(w1, *args, i1=i1, **kwargs)

    gq.apply_activation_ordering, gq.gptq_block_update = ordered, masked
    try:
        yield
    finally:
        gq.apply_activation_ordering, gq.gptq_block_update = order, block


def weights(group: str, observer: str, actorder: bool) -> dict:
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    if observer == "mse":  # else its default (min-max) observer
        w["observer"] = "mse"
    if actorder:
        w["actorder"] = "static"
    return {group: {"targets": ["Linear"], "weights": w}}


def modifiers(name: str) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    observer = "mse" if name.endswith("_mse") else "minmax"
    out = []
    if name.startswith("sparse24"):
        out.append(
            SparseGPTModifier(
                sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"], dampening_frac=0.01
            )
        )
    if name.startswith("rtn"):
        out.append(QuantizationModifier(config_groups=weights("group_0", observer, False), ignore=["re:.*lm_head"]))
    elif "gptq" in name:
        out.append(
            GPTQModifier(
                config_groups=weights("group_0", observer, True),
                ignore=["re:.*lm_head"],
                dampening_frac=0.01,
                block_size=1 if name.endswith("_keep0") else 128,
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("calib")
    p.add_argument("test")
    p.add_argument("out")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(a.model)
    lines = lambda f: [t for t in open(f, encoding="utf-8").read().splitlines() if t.strip()]  # noqa: E731
    calib, test = lines(a.calib), lines(a.test)
    rows = [tok(t, truncation=True, max_length=a.max_length) for t in calib]
    ds = Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "attention_mask": [r["attention_mask"] for r in rows]}
    )
    probe = tok(test[:16], truncation=True, max_length=a.max_length, padding=True, return_tensors="pt")
    original = GPT2LMHeadModel.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    result = {}
    for name in a.only:
        model = copy.deepcopy(original)
        names = to_linear(model)
        t = time.perf_counter()
        run = functools.partial(
            oneshot, model=model, dataset=ds, max_seq_length=a.max_length, num_calibration_samples=len(calib)
        )
        # its default "independent" pipeline gives each modifier its own block-by-block pass, in order:
        # SparseGPT prunes the whole model, then GPTQ quantizes the pruned one (lwpipe's prune, then quantize)
        with zeros_kept() if name.endswith("_keep0") else contextlib.nullcontext():
            run(recipe=modifiers(name))
        seconds = time.perf_counter() - t
        dense = copy.deepcopy(original)
        zeros = total = pairs = groups = 0
        with torch.no_grad():
            for n in names:
                lin = model.transformer.h.get_submodule(n)
                w = effective_weight(lin)  # [out, in]
                dense.transformer.h.get_submodule(n).weight.copy_(w.t())
                dense.transformer.h.get_submodule(n).bias.copy_(lin.bias)
                zeros += int((w == 0).sum())
                total += w.numel()
                g = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
                pairs += int((g >= 2).sum())
                groups += g.numel()
            diff = (model.eval()(**probe).logits - dense.eval()(**probe).logits).abs().max().item()
        out = Path(a.out) / name
        dense.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        result[name] = {
            "seconds": round(seconds, 1),
            "zero_fraction": round(zeros / total, 4),
            "groups_2of4": round(pairs / groups, 4),
            "max_logit_diff": diff,
        }
        print(f"peer {name}: {result[name]}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
