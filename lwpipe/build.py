"""Building a run from its recipe: the model, the data, the task and the Context, and the checks that the
model accepts the data, before any work.

    model, ctx = build_run(top, run_dir)      # a bad model.path is named as such, not as data.tokenizer
    check_fit(model, ctx, top)                # batch size, the task fits, the model takes a batch
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from lwpipe import checkpoint
from lwpipe.context import Context
from lwpipe.data import DataBundle
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.tasks import head, make_task, to_device

RESERVED_DATA_KEYS = ("batch_size", "meta")
# not builder arguments: read by the runner / recipes
RESERVED_MODEL_KEYS = ("checkpoint", "prune_layers", "compute_dtype")


def build_data(cfg: dict) -> DataBundle:
    kwargs = {k: v for k, v in cfg.items() if k not in RESERVED_DATA_KEYS}
    data = _instantiate(kwargs, "data")
    if isinstance(data, tuple) and len(data) == 2:
        data = DataBundle(data[0], data[1], name=cfg["_target_"])
    if not isinstance(data, DataBundle):
        raise ConfigError("data._target_", cfg["_target_"], "must return a DataBundle or a (train, test) pair")
    return data


def build_model(cfg: dict) -> nn.Module:
    return build_model_and_rebuild(cfg)[0]


def build_model_and_rebuild(cfg: dict) -> tuple[nn.Module, dict]:
    """(model, what model.lwp stores to rebuild it): a builder may return the model with its own rebuild
    description beside it (transformers models: their config, so no original directory is needed); else the
    recipe's model section is the description."""
    model, rebuild = _instantiate(builder_config(cfg), "model"), builder_config(cfg)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], dict):
        model, rebuild = model
    if not isinstance(model, nn.Module):
        raise ConfigError("model._target_", cfg["_target_"], f"must build an nn.Module, built {type(model).__name__}")
    if cfg.get("checkpoint"):
        checkpoint.load_weights(model, cfg["checkpoint"])
    return model, rebuild


def builder_config(cfg: dict) -> dict:
    """The recipe's model section less the keys that are not the builder's arguments."""
    return {k: v for k, v in cfg.items() if k not in RESERVED_MODEL_KEYS}


def _instantiate(cfg: dict, key: str):
    try:
        return instantiate(cfg, _convert_="all")
    except LwpipeError:
        raise
    except Exception as e:
        cause = e.__cause__ or e
        if isinstance(cause, LwpipeError):
            raise cause from None
        target = cfg.get("_target_")
        why = _import_problem(target) if str(cause).startswith("Error loading") else None
        # Hydra's own text spans lines and blames the wrong part ("'mypkg' is not a package")
        why = why or " ".join(str(cause).split())
        raise ConfigError(f"{key}._target_", target, f"could not be built: {why}") from None


def _import_problem(target) -> str | None:
    """Why a dotted `_target_` cannot be imported, in one line; None when the module imports and has it."""
    module, _, attr = str(target).rpartition(".")
    if not module:
        return "expected a dotted path module.callable (e.g. mypkg.build)"
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        return (
            f"no module named {e.name!r} (lwpipe imports from the working directory, PYTHONPATH and installed packages)"
        )
    except Exception as e:
        return f"importing {module} failed: {type(e).__name__}: {' '.join(str(e).split())}"
    return None if hasattr(found, attr) else f"module {module!r} has no attribute {attr!r}"


def check_fit(model: nn.Module, ctx: Context, top) -> None:
    """Before any work: the batch size is usable, the task fits, and the model accepts the data."""
    bs = top.data.get("batch_size", 64)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ConfigError("data.batch_size", bs, "must be a whole number >= 1")
    check_vocabulary(model, ctx.data)
    ctx.task.check(model, ctx.data)
    batch = to_device(head(ctx.test_loader()[0], 2), ctx.device)
    try:
        with torch.no_grad():
            ctx.task.forward(model.eval(), batch)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        shapes = (
            {k: tuple(v.shape[1:]) for k, v in batch.items()} if isinstance(batch, dict) else tuple(batch[0].shape[1:])
        )
        raise ConfigError(
            "model",
            top.model["_target_"],
            f"does not accept the data {ctx.data.name!r} for task {ctx.task.name} (inputs of shape {shapes}): {first}",
        ) from None


def check_vocabulary(model: nn.Module, data) -> None:
    """A tokenizer with more tokens than the model's embedding table would index past it."""
    size = getattr(data.train, "vocab_size", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    if size is not None and rows is not None and size > rows:
        raise ConfigError(
            "data.tokenizer",
            tokenizer_name(data),
            f"has {size} tokens but the model embeds {rows}: "
            "the tokenizer does not match the model (use the model's own directory)",
        )


def tokenizer_name(data) -> str:
    return getattr(getattr(data, "tokenizer", None), "name_or_path", data.name)


def save_tokenizer(data, run_dir: Path) -> None:
    """The sidecar of a text model's model.lwp: <run_dir>/tokenizer/, read by AutoTokenizer.from_pretrained."""
    tok = getattr(data, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(str(run_dir / "tokenizer"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "no CUDA device is available here; use cpu or auto")
    return torch.device(name)


def build_run(top, run_dir: Path) -> tuple[nn.Module, Context]:
    """The recipe's model (on its device) and the Context its stages run in."""
    device = pick_device(top.device)
    model, rebuild = build_model_and_rebuild(top.model)  # first: a bad model.path is named as such
    model = model.to(device)
    ctx = Context(
        data=build_data(top.data),
        seed=top.seed,
        run_dir=run_dir,
        batch_size=top.data.get("batch_size", 64),
        eval_batch_size=top.eval.batch_size,
        device=device,
        task=make_task(top.task.name),
        model_config=rebuild,
    )
    ctx.measure = top.measure  # export's deployable forms time themselves with these settings
    return model, ctx
