"""`model=sentence_transformer model.path=DIR`: a sentence-transformers directory, as a plain module.

modules.json lists the pipeline: a Transformer (the transformers model in the
directory or its sub-folder), a Pooling module (its config.json: mean, cls or
max) and optionally Normalize. `SentenceEncoder` computes the same embedding
as sentence-transformers' `encode` (without its batching), from
`model(input_ids=..., attention_mask=...)`, so the `embedding` task can feed it
like any transformers model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.models.hf import check_dtype_name, model_dir, model_dtype, own_memory

POOLING = ("mean", "cls", "max")
KNOWN = ("Transformer", "Pooling", "Normalize")


class SentenceEncoder(nn.Module):
    def __init__(self, transformer: nn.Module, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        if pooling not in POOLING:
            raise LwpipeError(f"pooling {pooling!r}: lwpipe knows {', '.join(POOLING)}")
        self.transformer, self.pooling, self.normalize = transformer, pooling, normalize

    @property
    def config(self):
        return self.transformer.config

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            emb = hidden[:, 0]
        elif self.pooling == "max":
            emb = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
        else:
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb


def read_modules(root: Path, path: str) -> tuple[Path, str, bool]:
    """(transformer directory, pooling mode, normalize) from modules.json and the pooling config."""
    spec = root / "modules.json"
    if not spec.is_file():
        raise ConfigError("model.path", path, f"not a sentence-transformers directory: {spec} is missing")
    modules = json.loads(spec.read_text())
    kinds = {m["type"].rpartition(".")[2]: m for m in modules}
    unknown = [m["type"] for m in modules if m["type"].rpartition(".")[2] not in KNOWN]
    if unknown or "Transformer" not in kinds or "Pooling" not in kinds:
        raise ConfigError(
            "model.path",
            path,
            f"modules.json lists {[m['type'] for m in modules]}; lwpipe reads Transformer + Pooling [+ Normalize]",
        )
    pool_cfg = root / kinds["Pooling"]["path"] / "config.json"
    if not pool_cfg.is_file():
        raise ConfigError("model.path", path, f"incomplete sentence-transformers directory: {pool_cfg} is missing")
    modes = [
        m
        for m in POOLING
        if json.loads(pool_cfg.read_text()).get(f"pooling_mode_{m}_tokens" if m != "cls" else "pooling_mode_cls_token")
    ]
    if len(modes) != 1:
        raise ConfigError(
            "model.path",
            path,
            f"{pool_cfg}: one pooling mode of {', '.join(POOLING)} expected, found {modes or 'none'}",
        )
    return root / kinds["Transformer"]["path"], modes[0], "Normalize" in kinds


def load_sentence_transformer(
    path: str | None = None, task: str = "embedding", dtype: str = "auto", device: str | None = None
) -> tuple[nn.Module, dict]:
    """(encoder, rebuild description): the encoder in `path`, in `dtype` (auto: the checkpoint's own;
    lwpipe.models.hf.model_dtype), and what model.lwp stores to rebuild it (`from_config`'s arguments)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.utils.logging.disable_progress_bar()
    if task != "embedding":
        raise ConfigError("task", task, "does not fit a sentence-transformers model; use task=embedding")
    check_dtype_name(dtype)
    root = _exists(path)
    tdir, pooling, normalize = read_modules(root, path)
    model_dir(str(tdir))
    try:
        torch_dtype = model_dtype(AutoConfig.from_pretrained(str(tdir), local_files_only=True), dtype, device)
        transformer = AutoModel.from_pretrained(str(tdir), local_files_only=True, dtype=torch_dtype)
    except ConfigError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError("model.path", path, f"transformers could not load {tdir}: {first}") from None
    model = SentenceEncoder(own_memory(transformer), pooling, normalize).eval()
    return model, rebuild_description(model)


def _exists(path: str | None) -> Path:
    if not path or not Path(path).expanduser().is_dir():
        raise ConfigError("model.path", path, "required: an existing sentence-transformers directory")
    return Path(path).expanduser()


def rebuild_description(model: SentenceEncoder) -> dict:
    """What model.lwp stores to rebuild the encoder: `from_config`'s arguments."""
    from lwpipe.models.hf import rebuild_description as hf_description

    inner = hf_description(model.transformer, "AutoModel")
    return {
        "_target_": "lwpipe.models.sentence.from_config",
        "config": inner["config"],
        "attn_implementation": inner["attn_implementation"],
        "dtype": inner["dtype"],
        "pooling": model.pooling,
        "normalize": model.normalize,
    }


def from_config(
    config: dict,
    pooling: str = "mean",
    normalize: bool = False,
    attn_implementation: str | None = None,
    dtype: str | None = None,
) -> SentenceEncoder:
    """Rebuild from the stored transformers config (lwpipe.models.hf.from_config's rules)."""
    from lwpipe.models.hf import from_config as hf_from_config

    inner = hf_from_config(config, "AutoModel", attn_implementation, dtype)
    return SentenceEncoder(inner, pooling, normalize).eval()
