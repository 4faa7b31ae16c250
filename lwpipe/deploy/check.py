"""A run's self-check of its deployable outputs: each is read back the way its runtime reads it, and a run
never reports success with a file that does not load or that holds other numbers than the pipeline's.

    compressed_tensors   transformers.AutoModelFor<task>.from_pretrained(DIR) (compressed-tensors decompresses
                         it; no lwpipe code in the loaded model): every tensor equals the pipeline model's bit
                         for bit, and its outputs on one test batch equal the pipeline's to `TOLERANCE`
    gguf                 gguf.GGUFReader: every tensor (quantized blocks dequantized by gguf.quants, F32 as is)
                         equals what the writer meant, and the metadata llama.cpp needs (architecture, block
                         count, width, heads, tokenizer model) is there with the model's values
    onnx                 nothing here: the export stage scores model.onnx in ONNX Runtime

`run(fmt, ...)` records the check under export.json's `<format>.check` and returns why it failed, or None;
the export stage writes export.json and then fails the run (exit 2, FAILED, no summary.json).
Both checks go one tensor at a time: the GGUF file is memory-mapped, and the pipeline model's constrained
weights are computed one layer at a time, never all at once.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lwpipe.deploy.gguf import module_tensors
from lwpipe.tasks import head, logits_of, model_device, model_inputs, to_device

TOLERANCE = 1e-4  # outputs: max |deployed - pipeline| / max |pipeline| on one test batch
AUTO = (
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForMaskedLM",
    "AutoModelForQuestionAnswering",
    "AutoModel",
)


def run(fmt: str, model: nn.Module, ctx, cfg, out: Path, info: dict) -> str | None:
    """Checks the `fmt` output just written under `out`; records info['check']; why it failed, or None."""
    checks = {"compressed_tensors": compressed_tensors, "gguf": gguf_file}
    if fmt not in checks:
        return None
    start = time.perf_counter()
    record, why = checks[fmt](model, ctx, cfg, out)
    record["seconds"] = round(time.perf_counter() - start, 3)
    info["check"] = record
    if why is None:
        return None
    return f"the run's own {info['file']} {why}, so the run failed"


def auto_class(hf):
    """The transformers Auto class a user loads this model with (the first whose mapping gives its class)."""
    import transformers

    for name in AUTO:
        auto = getattr(transformers, name)
        try:
            if auto._model_mapping[type(hf.config)] is type(hf):
                return auto
        except KeyError:
            continue
    return transformers.AutoModel


@torch.no_grad()
def compressed_tensors(model: nn.Module, ctx, cfg, out: Path) -> tuple[dict, str | None]:
    target = out / "compressed_tensors"
    auto = auto_class(model)
    record = {"loads": False, "loader": f"transformers.{auto.__name__}.from_pretrained"}
    try:
        loaded = auto.from_pretrained(str(target)).eval()
    except Exception as e:  # whatever transformers raises, the directory does not load
        return record, f"does not load with {record['loader']}: {type(e).__name__}: {e}"
    record["loads"] = True
    foreign = sorted({type(m).__module__ for m in loaded.modules() if type(m).__module__.startswith("lwpipe")})
    if foreign:
        return record, f"loads with lwpipe code in the model ({foreign})"
    batch = model_inputs(head(ctx.test_loader()[0], 8))
    want = first_output(model(**to_device(batch, model_device(model)))).float().cpu()
    got = first_output(loaded(**batch)).float()  # the first forward decompresses the weights (compressed-tensors)
    record["max_rel_diff"] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    wrong = tensor_mismatch(loaded, model)
    record["weights_exact"] = wrong is None
    del loaded
    gc.collect()
    if wrong:
        return record, f"loads in transformers with other weights than the pipeline's: {wrong}"
    if not record["max_rel_diff"] <= TOLERANCE:
        return record, f"gives other outputs than the pipeline: max relative difference {record['max_rel_diff']:.3g}"
    return record, None


def first_output(out) -> torch.Tensor:
    """A transformers model's logits, or its first output (a base model's last hidden state)."""
    if getattr(out, "logits", None) is None and hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return logits_of(out)


def tensor_mismatch(loaded: nn.Module, model: nn.Module) -> str | None:
    """The first tensor of `model` (constraints applied, one layer at a time) that `loaded` lacks or holds
    with other values, as 'tensor NAME ...'; None when every one is equal bit for bit."""
    mods = dict(loaded.named_modules())
    for mname, m in model.named_modules():
        if "parametrizations" in mname.split("."):  # a constraint's internals (original, mask, ...)
            continue
        for name, want in module_tensors(m).items():
            full = f"{mname}.{name}" if mname else name
            got = getattr(mods.get(mname), name, None)
            if not isinstance(got, torch.Tensor):
                return f"tensor {full} is missing"
            want = want.cpu()
            if got.shape != want.shape or got.dtype != want.dtype:
                return f"tensor {full} is {got.dtype} {tuple(got.shape)}, not {want.dtype} {tuple(want.shape)}"
            if not torch.equal(got.detach(), want):
                diff = float((got.detach().double() - want.double()).abs().max())
                return f"tensor {full} differs (max abs difference {diff:.3g})"
    return None


def gguf_file(model: nn.Module, ctx, cfg, out: Path) -> tuple[dict, str | None]:
    import gguf

    from lwpipe.deploy import gguf as writer
    from lwpipe.deploy.gguf_vocab import kind_of

    path = out / "model.gguf"
    record = {"loads": False, "reader": "gguf.GGUFReader"}
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a file GGUFReader cannot parse
        return record, f"does not load with gguf.GGUFReader: {type(e).__name__}: {e}"
    record["loads"] = True
    c = model.config
    tok = getattr(ctx.data, "tokenizer", None)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, writer.ARCHS[c.model_type])]
    want = {
        "general.architecture": arch,
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        "tokenizer.ggml.model": "none" if tok is None else kind_of(tok),
    }
    for key, value in want.items():
        got = field(reader, key)
        if got != value:
            return record, f"has metadata {key}={got!r}, not {value!r}"
    record["metadata"] = want
    tensors = {t.name: t for t in reader.tensors}
    for target, name, _, qtype, _, intended in writer.planned(model, cfg):
        t = tensors.pop(target, None)
        why = tensor_differs(t, qtype, intended)
        if why:
            return record, f"tensor {target} ({name}) {why}"
    if tensors:
        return record, f"holds tensors the model does not have: {sorted(tensors)[:3]}"
    record |= {"tensors": len(reader.tensors), "exact": True}
    return record, None


def tensor_differs(t, qtype, intended: torch.Tensor) -> str | None:
    """Why the GGUF tensor `t` does not read back as `intended` (its type `qtype`, None for F32), or None."""
    import gguf

    if t is None:
        return "is missing"
    kind = qtype or gguf.GGMLQuantizationType.F32
    if t.tensor_type != kind:
        return f"is {t.tensor_type.name}, not {kind.name}"
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGML lists the fastest axis first
    if shape != tuple(intended.shape):
        return f"has shape {shape}, not {tuple(intended.shape)}"
    back = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
    want = intended.float().numpy()
    back = back.reshape(want.shape)
    if not np.array_equal(back, want):
        return f"reads back other values than written (max abs difference {float(np.abs(back - want).max()):.3g})"
    return None


def field(reader, key: str):
    """A GGUF metadata value: a string or an int; None when the key is absent."""
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[-1]
    return bytes(value).decode() if value.dtype == np.uint8 else int(value[0])
