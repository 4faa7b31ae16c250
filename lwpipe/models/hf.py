"""`model=hf model.path=DIR`: a transformers model saved with save_pretrained, read from local files only.

The auto class comes from the task (text_classification: AutoModelForSequenceClassification,
causal_lm: AutoModelForCausalLM, embedding: AutoModel). `load_hf` returns the model and, beside it,
its rebuild description: JSON (`from_config`: the transformers config and the auto class) that model.lwp
stores, so `lwpipe.load` rebuilds the model without DIR. `from_config` builds only classes the
transformers package itself maps that config to: no import named by the file, no remote code.
"""

from __future__ import annotations

import ctypes
import json
import mmap
from pathlib import Path

import torch
from torch import nn

from lwpipe.errors import ConfigError, LwpipeError

AUTO_CLASSES = {
    "text_classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "embedding": "AutoModel",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def model_dir(path: str | None, key: str = "model.path") -> Path:
    """The directory, checked: config.json and a weights file present (else one error naming what is missing)."""
    if not path or path == "???":
        raise ConfigError(key, path, "required: a directory written by save_pretrained (config.json + weights)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(key, path, "directory does not exist")
    if not (p / "config.json").is_file():
        raise ConfigError(key, path, f"incomplete model directory: {p / 'config.json'} is missing")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(
            key,
            path,
            f"incomplete model directory: no weights file (model.safetensors or "
            f"pytorch_model.bin, or their .index.json) in {p}",
        )
    return p


def context_length(path: str) -> int | None:
    """The longest input the model in `path` takes (its config.json's max_position_embeddings, n_positions or
    max_sequence_length); None when the directory or the key is missing (the loader names a bad path)."""
    p = Path(str(path)).expanduser() / "config.json"
    try:
        config = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            return config[key]
    return None


def auto_class(task: str) -> str:
    if task not in AUTO_CLASSES:
        raise ConfigError("task.name", task, f"model=hf serves the tasks {', '.join(AUTO_CLASSES)}")
    return AUTO_CLASSES[task]


def load_hf(
    path: str | None = None,
    task: str = "text_classification",
    num_labels: int | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> tuple[nn.Module, dict]:
    """(model, rebuild description): the model in `path` (local files only), with the head `task` needs, in
    `dtype` (auto: the checkpoint's); the description is what model.lwp stores to rebuild it (`from_config`)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per load is noise in a run log
    check_dtype_name(dtype)
    p = model_dir(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise ConfigError("model.path", path, f"config.json is not a transformers config: {_first(e)}") from None
    if task == "causal_lm":
        from lwpipe.tasks.causal_lm import is_causal_lm

        if not is_causal_lm(config):
            raise ConfigError(
                "task",
                task,
                f"does not fit the model in {path}: {config.model_type} is not a causal "
                "(decoder) language model; use task=text_classification or task=embedding",
            )
    kwargs = {}
    if num_labels is not None and task == "text_classification" and num_labels != config.num_labels:
        kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True}  # a new head of that size
    cls = getattr(transformers, auto_class(task))
    kwargs["dtype"] = model_dtype(config, dtype, device)
    try:
        model = cls.from_pretrained(str(p), local_files_only=True, **kwargs)
    except Exception as e:
        raise ConfigError(
            "model.path", path, f"transformers could not load it as {cls.__name__}: {_first(e)}"
        ) from None
    if getattr(model.config, "pad_token_id", None) is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id  # as data=text pads (GPT-2 has no pad token)
    model = own_memory(model).eval()
    return model, rebuild_description(model, auto_class(task))


def check_dtype_name(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError("model.dtype", dtype, f"allowed: auto (the checkpoint's own), {', '.join(DTYPES)}")


def model_dtype(config, dtype: str, device: str | None) -> torch.dtype:
    """The dtype the model is loaded and kept in: `dtype`, or with auto the one its config.json names (float32
    when it names none). A device that cannot compute it is refused here, before any weight is read."""
    check_dtype_name(dtype)
    if dtype == "auto":
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        name = str(stored).removeprefix("torch.") if stored is not None else "float32"
        dtype = name if name in DTYPES else "float32"
    check_device(dtype, device)
    return DTYPES[dtype]


def check_device(dtype: str, device: str | None) -> None:
    """bf16 on a GPU that cannot compute it (before Ampere) is a clear error naming model.dtype, not a kernel
    failure mid-run. CPUs compute bf16 and fp16 in torch (slowly where they lack the instructions)."""
    if dtype != "bfloat16" or device not in ("cuda", "auto") or not torch.cuda.is_available():
        return
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(
            "model.dtype",
            dtype,
            f"the device {torch.cuda.get_device_name()} cannot compute {dtype}; use model.dtype=float32 or device=cpu",
        )


def dtype_of(model: nn.Module) -> str:
    """The name of the dtype most of the model's parameter bytes are in (float32 when it has none)."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return str(max(sizes, key=sizes.get)).removeprefix("torch.") if sizes else "float32"


def to_dtype(model: nn.Module, dtype: str | None) -> nn.Module:
    """Parameters in `dtype` (buffers such as rotary inv_freq keep the dtype they are built in, as
    from_pretrained leaves them)."""
    if dtype and dtype != "float32":
        check_dtype_name(dtype)
        for p in model.parameters():
            p.data = p.data.to(DTYPES[dtype])
    return model


@torch.no_grad()
def own_memory(model: nn.Module) -> nn.Module:
    """Fresh, aligned copies of tensors read from a memory-mapped file: with their odd offsets a layer's
    matmul took another SIMD path, so the same weights in model.lwp's rebuild gave outputs differing
    in the last bit. Tied parameters stay tied (one Parameter object)."""
    mapped = mapped_ranges(".safetensors")
    for t in [*model.parameters(), *model.buffers()]:
        old, t.data = t.data, t.data.clone()
        drop_mapped_pages(old, mapped)  # else the file's pages stay in RSS beside the copies: 2x the model
    return model


def mapped_ranges(suffix: str) -> list[tuple[int, int]]:
    """(start, end) of this process's memory mappings of files ending in `suffix` (Linux; else none)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(suffix):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def drop_mapped_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Tell the kernel this process no longer needs the whole pages of a file mapping that `t` was read from
    (madvise DONTNEED: they leave its RSS and stay in the page cache; only pages inside a mapping of the
    checkpoint file itself, so no other data shares them)."""
    if t.device.type != "cpu" or not mapped or not t.numel():
        return
    page = mmap.PAGESIZE
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    start, end = -(-lo // page) * page, hi // page * page
    if end <= start or not any(a <= start and end <= b for a, b in mapped):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


def rebuild_description(model: nn.Module, auto: str) -> dict:
    """What model.lwp stores to rebuild `model` without its directory: `from_config`'s arguments."""
    config = model.config.to_dict()
    config.pop("auto_map", None)  # remote code is never run
    config.pop("_name_or_path", None)  # a local path: not needed to rebuild, and not the file's business
    return {
        "_target_": "lwpipe.models.hf.from_config",
        "config": json.loads(json.dumps(config)),
        "auto_class": auto,
        "attn_implementation": model.config._attn_implementation,
        "dtype": dtype_of(model),
    }


def from_config(
    config: dict, auto_class: str, attn_implementation: str | None = None, dtype: str | None = None
) -> nn.Module:
    """Rebuild a model from its transformers config (as model.lwp stores it), its parameters in `dtype` (the
    dtype it was encoded in; files without one: float32); weights come from the file."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if auto_class not in AUTO_CLASSES.values():
        raise LwpipeError(f"auto_class {auto_class!r} is not one of {', '.join(AUTO_CLASSES.values())}")
    config = dict(config)
    kind = config.pop("model_type", None)
    if kind not in CONFIG_MAPPING:
        raise LwpipeError(f"model_type {kind!r} is not a transformers model type")
    config.pop("auto_map", None)
    cfg = CONFIG_MAPPING[kind].from_dict(config)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = getattr(transformers, auto_class).from_config(cfg, **kwargs).float()
    if not type(model).__module__.startswith("transformers."):
        raise LwpipeError(f"{type(model).__name__} is not a class of the transformers package")
    if dtype is not None and dtype not in DTYPES:
        raise LwpipeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return to_dtype(model, dtype).eval()


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
