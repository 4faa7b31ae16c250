"""The runner: threads a model through the recipe's stages.

    model = build(recipe.model);  data = build(recipe.data)      # after validation
    ctx.task = task(recipe.task)   # batch format, loss, metric; the loop below never asks which task
    check: the model accepts a batch, the task fits model and data, layer settings name real layers
    run_dir <- recipe.yaml (resolved recipe), run_info.json         # reproducibility (provenance.py)
    key = cache.initial_key(recipe)
    record(step 0, event "baseline")           # task.evaluate + measure the input model; cached: replayed
    for step, stage in enumerate(recipe.pipeline, 1):
        key = cache.stage_key(key, stage)
        if every stage so far was cached and cache has key:        # model state + the stage's records
            model = cache.load(key); re-log its records with cached=true; copy the files it wrote (export.pt)
        else:
            model = stage.run(model, ctx)                          # epoch records logged from inside
            record(step, event "stage_end"); cache.store(key, model, records, its model.lwp); log it
        checkpoint(model) -> checkpoints/<step>_<name>.safetensors  # cache on: a copy of the entry's state file
        before any compression: ctx.reference = copy(model)        # teacher; only if a later stage trains
        a later stage names it as teacher: ctx.snapshots[name] = copy(model)
    model.lwp <- encode(model, model.lwpipe_rebuild or recipe.model)  # its size: every record's compressed_bytes
                 (the last stage's encoding; cached: the entry's copy)
    verify: lwpipe.load(model.lwp) computes exactly what model does, else the run fails (no summary.json)
    tokenizer/ <- the data's tokenizer, if any (next to model.lwp)
    loggers.finish(summary)                                         # report.png, report.md
    summary.json <- baseline, every stage_end, final, seconds       # written last, atomically

A run directory without summary.json did not finish. A run killed mid-pipeline
and started again takes its completed stages from the cache. The reference (ctx.reference and
its outputs ctx.reference_outputs, which teacher_agreement and export.json compare with) is made only
when a stage is computed: an identical rerun evaluates and copies nothing.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from lwpipe import cache, checkpoint, provenance, speed
from lwpipe.artifact import encode_model, size_metrics
from lwpipe.cache import StageCache
from lwpipe.config import Recipe
from lwpipe.constraints import clone, effective_tensors
from lwpipe.context import Context, stage_seed
from lwpipe.data import DataBundle
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.loggers import build_loggers, progress_hook
from lwpipe.metrics import evaluate, measure
from lwpipe.tasks import Task, head, make_task, to_device

log = logging.getLogger("lwpipe")
RESERVED_DATA_KEYS = ("batch_size", "meta")
RESERVED_MODEL_KEYS = ("checkpoint", "prune_layers")  # not builder arguments: read by the runner / recipes


def build_data(cfg: dict) -> DataBundle:
    kwargs = {k: v for k, v in cfg.items() if k not in RESERVED_DATA_KEYS}
    data = _instantiate(kwargs, "data")
    if isinstance(data, tuple) and len(data) == 2:
        data = DataBundle(data[0], data[1], name=cfg["_target_"])
    if not isinstance(data, DataBundle):
        raise ConfigError("data._target_", cfg["_target_"], "must return a DataBundle or a (train, test) pair")
    return data


def build_model(cfg: dict) -> nn.Module:
    model = _instantiate(builder_config(cfg), "model")
    if not isinstance(model, nn.Module):
        raise ConfigError("model._target_", cfg["_target_"], f"must build an nn.Module, built {type(model).__name__}")
    if cfg.get("checkpoint"):
        checkpoint.load_weights(model, cfg["checkpoint"])
    return model


def builder_config(cfg: dict) -> dict:
    """The recipe's model section less the keys that are not the builder's arguments."""
    return {k: v for k, v in cfg.items() if k not in RESERVED_MODEL_KEYS}


def rebuild_config(model: nn.Module, cfg: dict) -> dict:
    """What model.lwp stores to rebuild the model: the builder's own description (transformers models:
    their config, so no original directory is needed), else the recipe's model section."""
    return getattr(model, "lwpipe_rebuild", None) or builder_config(cfg)


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


def warn_if_larger(s, before: dict, after: dict) -> None:
    """A compression stage whose model.lwp is larger than the one before it gained nothing (share.bits=16)."""
    larger = after.get("compressed_bytes", 0) > before.get("compressed_bytes", float("inf"))
    if getattr(s.cls, "compresses", False) and larger:
        log.warning(
            "stage %s made model.lwp larger: %s -> %s bytes; its settings buy nothing here",
            s.name,
            f"{before['compressed_bytes']:,}",
            f"{after['compressed_bytes']:,}",
        )


ONE_SHOT = ("prune", "share", "quantize")  # with finetune.epochs 0 (and no taylor scores) they never train


def needs_reference(steps) -> bool:
    """Whether a stage among `steps` may use ctx.reference (a teacher, or a task loss that trains towards
    it). One-shot prune/share/quantize do not: without the copy a large model's run keeps one copy fewer."""

    def one_shot(s) -> bool:
        cfg = s.config
        return (
            s.type in ONE_SHOT
            and getattr(getattr(cfg, "finetune", None), "epochs", 1) == 0
            and getattr(cfg, "criterion", None) not in ("taylor", "gradient", "saliency")
            and getattr(cfg, "bits", None) != "auto"
        )  # gradients of the task loss, which may need it

    return not all(one_shot(s) for s in steps)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference: an eval-mode copy whose parameters take no gradients."""
    ref = clone(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def written_by(s) -> tuple[str, ...]:
    """The files a stage may write into the run directory (its class's `writes`): kept in its cache entry
    and copied into the run directory of a run that replays the stage."""
    return tuple(getattr(s.cls, "writes", ()))


def verify_artifact(path: Path, model: nn.Module) -> None:
    """The written model.lwp loads (lwpipe.load, as a user loads it) to exactly the weights `model` computes
    with; LwpipeError otherwise, so a run never reports success with a file nothing can read."""
    from lwpipe.artifact import ArtifactError, load

    try:
        loaded = load(path, trusted=True)  # the run built this very config itself
    except ArtifactError as e:
        raise LwpipeError(f"the run's own {path.name} does not load, so the run failed: {e}") from None
    wrong = artifact_mismatch(loaded, model)
    if wrong:
        raise LwpipeError(
            f"the run's own {path.name} decodes to other weights than the model it was written "
            f"from ({wrong}), so the run failed"
        )


@torch.no_grad()
def artifact_mismatch(loaded: nn.Module, model: nn.Module) -> str | None:
    """The first tensor of `loaded` that `model` (constraints applied) does not compute bit for bit; None."""
    modules = dict(model.named_modules())
    for name, got in effective_tensors(loaded).items():
        owner, _, attr = name.rpartition(".")
        want = getattr(modules.get(owner), attr, None)
        if not isinstance(want, torch.Tensor):
            return f"{name}: the model has no such tensor"
        if not same_values(want.detach().cpu(), got):
            return f"{name} differs"
    return None


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values (NaN where the other has NaN; a float16-stored bias equals its float32 value)."""
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "no CUDA device is available here; use cpu or auto")
    return torch.device(name)


def run(recipe: Recipe, run_dir: Path) -> dict:
    """Run every stage of a validated recipe; returns the final record."""
    top = recipe.top
    run_dir = Path(run_dir)
    started = time.perf_counter()
    torch.manual_seed(top.seed)
    device = pick_device(top.device)
    model = build_model(top.model).to(device)  # first: a bad model.path is named as such, not as data.tokenizer
    data = build_data(top.data)
    task: Task = make_task(top.task.name)
    ctx = Context(
        data=data,
        seed=top.seed,
        run_dir=run_dir,
        batch_size=top.data.get("batch_size", 64),
        eval_batch_size=top.eval.batch_size,
        device=device,
        task=task,
    )
    ctx.measure = top.measure  # export's deployable forms time themselves with these settings
    check_fit(model, ctx, top)
    speed.check_settings(top.measure, ctx)
    for s in recipe.steps:  # settings that name layers are checked before any work
        check = getattr(s.cls, "check_model", None)
        if check:
            check(s.config, model, f"stages.{s.name}")
        check = getattr(s.cls, "check_context", None)  # calibration data the stage needs, and its format
        if check:
            check(s.config, ctx, f"stages.{s.name}")
    wanted = {getattr(s.config, "teacher", None) for s in recipe.steps}
    stage_cache = StageCache(
        top.cache.dir,
        top.cache.enabled,
        top.cache.max_bytes,  # checks it is writable
        top.cache.wait_seconds,
    )
    provenance.write_run_files(run_dir, recipe)
    key = cache.initial_key(top, data.identity)
    initial = clone(model) if stage_cache.enabled else None  # cached states load into copies of the input;
    # kept through the run: a job beside this one may store a later stage meanwhile (cache=false saves the copy)
    base_key = cache.baseline_key(key, top)
    loggers = build_loggers(top.logger, run_dir)
    records: list[dict] = []
    current: list[dict] = []  # the records of the stage now running
    last_blob: list = [None, b""]  # [step, bytes] of the latest encoding

    def emit(rec: dict) -> None:
        for lg in loggers:
            lg.log(rec)

    def snapshot(model: nn.Module, step: int, stage: str, event: str, seconds: float, **extra) -> dict:
        t = time.perf_counter()
        quality, _ = evaluate(model, ctx.test_loader(), ctx.reference_outputs, task)
        rec = {
            "step": step,
            "stage": stage,
            "event": event,
            **quality,
            "reference": "uncompressed",
            **measure(model),
            "seconds": seconds,
            **extra,
            "cached": False,
        }
        if event != "epoch":  # the real size: this step's model encoded as model.lwp
            last_blob[:] = [step, encode_model(model, rebuild_config(model, top.model))]
            # against the input model's fp32 bytes: structured pruning and factorize shrink dense_bytes itself
            rec.update(size_metrics(len(last_blob[1]), records[0]["dense_bytes"] if records else rec["dense_bytes"]))
            rec.update(speed.speed_record(model, ctx, top.measure, records[0] if records else None))
        rec["eval_seconds"] = time.perf_counter() - t
        return rec

    def on_epoch(model: nn.Module, epoch: int, train_loss: float, **fields) -> None:
        nonlocal in_stage_overhead
        t = time.perf_counter()
        current.append(
            snapshot(
                model,
                ctx.step,
                ctx.stage,
                "epoch",
                t - stage_start - in_stage_overhead,
                epoch=epoch,
                train_loss=train_loss,
                **fields,
            )
        )
        emit(current[-1])
        in_stage_overhead += time.perf_counter() - t

    pending: list = [model, recipe.steps]  # the uncompressed model the reference is made of, the steps after it

    def settle_reference() -> None:
        """Make the pending model's reference: before a record is measured or a stage runs (and changes it)."""
        if pending[0] is not None:
            ctx.reference = frozen_copy(pending[0]) if needs_reference(pending[1]) else None
            _, ctx.reference_outputs = evaluate(pending[0], ctx.test_loader(), task=task)
            pending[0] = None

    ctx.on_epoch, ctx.on_batch = on_epoch, progress_hook(loggers)
    try:
        replay = stage_cache.load_records(base_key)
        if replay:
            records.append({**replay[0], "cached": True})
        else:
            settle_reference()
            records.append(snapshot(model, 0, "input", "baseline", 0.0))
            stage_cache.store_records(base_key, records[-1:])
        emit(records[-1])
        compressed, hit, work_seconds, in_stage_overhead = False, True, 0.0, 0.0
        for step, s in enumerate(recipe.steps, 1):
            ctx.step, ctx.stage = step, s.name
            key = cache.stage_key(key, step, s.name, s.type, s.config.model_dump(mode="json"))
            current.clear()
            ctx.stage_record = {}
            restored = clone(initial) if initial is not None else None  # another job may have stored it
            replay = stage_cache.claim(key, restored) if restored is not None else None
            if replay is not None and not stage_cache.restore_outputs(key, written_by(s), run_dir):
                replay = None  # the files it wrote into the run directory are lost: computed again
            hit = replay is not None
            log.info("[%d/%d] %s (%s)%s", step, len(recipe.steps), s.name, s.type, " from cache" if hit else "")
            if hit:
                model = restored.to(ctx.device)
                current.extend({**r, "cached": True} for r in replay)
                for r in current:
                    emit(r)
            else:
                settle_reference()
                torch.manual_seed(stage_seed(top.seed, step, s.name))
                stage_start, in_stage_overhead = time.perf_counter(), 0.0
                model = s.cls(s.config).run(model, ctx)
                seconds = time.perf_counter() - stage_start - in_stage_overhead  # the stage's own work
                work_seconds += seconds
            compressed = compressed or getattr(s.cls, "compresses", False)
            if not compressed:  # still uncompressed: this is the reference the compressed model is held to
                pending[:] = [model, recipe.steps[step:]]
            if s.name in wanted:
                ctx.snapshots[s.name] = clone(model).eval()
            if not hit:
                settle_reference()
                current.append(snapshot(model, step, s.name, "stage_end", seconds, type=s.type, **ctx.stage_record))
                warn_if_larger(s, records[-1], current[-1])
                stage_cache.store(
                    key,
                    model,
                    current,
                    last_blob[1],  # first: a logged stage_end is resumable
                    {n: run_dir / n for n in written_by(s) if (run_dir / n).is_file()},
                )
                emit(current[-1])
            records.append(current[-1])
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            path = run_dir / "checkpoints" / f"{step:02d}_{s.name}.safetensors"
            if not stage_cache.copy_state(key, path):  # the entry's file: byte-identical in every run
                checkpoint.save_state(model, path)
        final = {**records[-1], "event": "final"}
        if top.artifact:  # before summary.json: a finished run has its artifact
            # the last stage_end already encoded this very model; from the cache, its entry holds that encoding
            blob = (
                last_blob[1]
                if last_blob[0] == len(recipe.steps)
                else (hit and recipe.steps and stage_cache.file(key, ".lwp"))
                or encode_model(model, rebuild_config(model, top.model))
            )
            save_tokenizer(data, run_dir)
            checkpoint.atomic_write(run_dir / "model.lwp", lambda tmp: Path(tmp).write_bytes(blob))
            verify_artifact(run_dir / "model.lwp", model)
            final.update(size_metrics(len(blob), records[0]["dense_bytes"]))
        summary = {
            "recipe": top.name,
            "seed": top.seed,
            "baseline": records[0],
            "stages": records[1:],
            "final": final,
            "seconds": time.perf_counter() - started,
            "stage_seconds": work_seconds,
        }
        for lg in loggers:  # what loggers write into the run directory (report.png), before summary.json
            getattr(lg, "finish", lambda _: None)(summary)
        checkpoint.atomic_write(
            run_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2))
        )
        return final
    finally:
        stage_cache.release()  # a stage that failed: jobs waiting for it compute it themselves
        for lg in loggers:
            lg.close()
