"""The runner: threads a model through the recipe's stages.

    run(): build, check, baseline, for each step execute-or-replay, finish; the bookkeeping (records, the
    latest encoding, the reference, the cache's replays) is the Run object's. In order:

    model = build(recipe.model);  data = build(recipe.data)      # after validation (lwpipe/build.py)
    ctx.task = task(recipe.task)   # batch format, loss, metric; the loop below never asks which task
    check: the model accepts a batch, the task fits model and data, layer settings name real layers,
           each stage's calibration data is there (lwpipe/stages/order.py: from the stages' declarations)
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
    model.lwp <- encode(model, ctx.model_config, resized)  # its size: every record's compressed_bytes
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

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from lwpipe import cache, checkpoint, compute, memory, provenance, speed
from lwpipe.artifact import size_metrics
from lwpipe.artifact.encode import encoded_size, write_encoded
from lwpipe.build import (  # noqa: F401  (the runner's public names before lwpipe/build.py)
    _instantiate,
    build_data,
    build_model,
    build_run,
    builder_config,
    check_fit,
    pick_device,
    save_tokenizer,
)
from lwpipe.cache import StageCache
from lwpipe.config import Recipe
from lwpipe.constraints import clone
from lwpipe.context import Context, stage_seed
from lwpipe.grid import pin_deferred
from lwpipe.input_copy import InputCopy
from lwpipe.loggers import build_loggers, progress_hook
from lwpipe.metrics import evaluate, measure
from lwpipe.stages import order
from lwpipe.stages.order import needs_reference
from lwpipe.structured import layer_shapes, resized
from lwpipe.verify import verify_artifact

log = logging.getLogger("lwpipe")


def run(recipe: Recipe, run_dir: Path) -> dict:
    """Run every stage of a validated recipe; returns the final record."""
    started = time.perf_counter()
    torch.manual_seed(recipe.top.seed)
    model, ctx = build_run(recipe.top, Path(run_dir))
    # bf16/fp16 weights compute in float32 on a CPU (lwpipe.compute); an export traces the model as it is
    widen = compute.compute_dtype(recipe.top.model.get("compute_dtype", "auto"), model, ctx.device)
    ctx.compute = widen
    with compute.upcast(widen):
        check_fit(model, ctx, recipe.top)
    large = memory.map_large_allocations(sum(p.numel() * p.element_size() for p in model.parameters()))
    speed.check_settings(recipe.top.measure, ctx)
    order.check_before_work(recipe.steps, model, ctx)  # settings that name layers, calibration data
    state = Run(recipe, Path(run_dir), model, ctx, started)
    state.trim = large  # a large model's records hand their work pages back; a small one's cost no trim
    provenance.add_run_info(run_dir, compute_dtype=compute.computed_in(widen, model))
    try:
        with compute.upcast(widen):
            state.baseline(model)
        for step, s in enumerate(recipe.steps, 1):
            with compute.upcast(widen if s.type != "export" else None):
                cached = state.replay(step, s)  # its model from the cache, or None
                model = cached if cached is not None else state.execute(step, s, model)
            with compute.upcast(widen):
                state.after_stage(step, s, model)
        return state.finish(model)
    finally:
        state.close()


class Run:
    """One run's bookkeeping: its records, the latest encoding, the reference, the cache and its replays."""

    def __init__(self, recipe: Recipe, run_dir: Path, model: nn.Module, ctx: Context, started: float):
        self.top, self.steps, self.run_dir, self.ctx, self.started = recipe.top, recipe.steps, run_dir, ctx, started
        c = self.top.cache
        self.cache = StageCache(c.dir, c.enabled, c.max_bytes, c.wait_seconds)  # checks it is writable
        provenance.write_run_files(run_dir, recipe)
        self.key = cache.initial_key(self.top, ctx.data.identity)
        # cached states load into copies of the input; kept through the run (on disk: the input's tensors in a
        # file, the model's structure on the meta device): a job beside this one may store a later stage meanwhile
        self.initial = InputCopy(model, run_dir / ".input.safetensors") if self.cache.enabled else None
        self.built_shapes = layer_shapes(model)  # a structurally pruned model's layers are smaller: model.lwp says so
        self.loggers = build_loggers(self.top.logger, run_dir)
        self.records: list[dict] = []
        self.current: list[dict] = []  # the records of the stage now running
        self.encoded_file = run_dir / ".encoded.lwp"  # the latest record's model.lwp, on disk, not in memory
        self.encoded_step: int | None = None  # the step it encodes
        self.pending = (model, self.steps)  # the uncompressed model the reference is made of, the steps after it
        self.compressed = False
        self.trim = False  # memory.release_freed_memory after each record (large models: run() sets it)
        self.teachers = {getattr(s.config, "teacher", None) for s in self.steps}
        self.hit = True  # the last stage came from the cache
        self.stage_start = self.overhead = self.seconds = self.work_seconds = 0.0
        ctx.on_epoch, ctx.on_batch = self.on_epoch, progress_hook(self.loggers)

    def emit(self, rec: dict) -> None:
        for lg in self.loggers:
            lg.log(rec)

    def snapshot(self, model: nn.Module, step: int, stage: str, event: str, seconds: float, **extra) -> dict:
        """A record of `model` now: its quality, size and (not for epochs) its encoding and timing."""
        t, first = time.perf_counter(), self.records[0] if self.records else None
        quality, _ = evaluate(model, self.ctx.test_loader(), self.ctx.reference_outputs, self.ctx.task)
        rec = {"step": step, "stage": stage, "event": event, **quality, "reference": "uncompressed"}
        rec.update({**measure(model), "seconds": seconds, **extra, "cached": False})
        if event != "epoch":  # the real size: this step's model encoded as model.lwp
            if step == 0 and self.steps:  # the input's file is never written: its size alone, no bytes held
                size = encoded_size(model, self.ctx.model_config, resized(model, self.built_shapes))
            else:
                size = self.encode(model, self.encoded_file)
                self.encoded_step = step
            # against the input model's fp32 bytes: structured pruning and factorize shrink dense_bytes itself
            rec.update(size_metrics(size, (first or rec)["dense_bytes"]))
            rec.update(speed.speed_record(model, self.ctx, self.top.measure, first))
        rec["eval_seconds"] = time.perf_counter() - t
        if self.trim:  # the record's work tensors: their pages back to the system
            memory.release_freed_memory()
        return rec

    def on_epoch(self, model: nn.Module, epoch: int, train_loss: float, **fields) -> None:
        """ctx.on_epoch: the epoch's record; its evaluation does not count as the stage's work."""
        t = time.perf_counter()
        seconds = t - self.stage_start - self.overhead
        ctx = self.ctx
        rec = self.snapshot(model, ctx.step, ctx.stage, "epoch", seconds, epoch=epoch, train_loss=train_loss, **fields)
        self.current.append(rec)
        self.emit(rec)
        self.overhead += time.perf_counter() - t

    def settle_reference(self) -> None:
        """Make the pending model's reference: before a record is measured or a stage runs (and changes it)."""
        model, after = self.pending
        if model is not None:
            timing = self.top.measure.latency
            self.ctx.reference = frozen_copy(model) if needs_reference(after, timing) else None
            _, self.ctx.reference_outputs = evaluate(model, self.ctx.test_loader(), task=self.ctx.task)
            self.pending = (None, after)

    def baseline(self, model: nn.Module) -> None:
        """Step 0: the input model's record, from the cache when it has it."""
        base_key = cache.baseline_key(self.key, self.top)
        replay = self.cache.load_records(base_key)
        if replay:
            self.records.append({**replay[0], "cached": True})
        else:
            self.settle_reference()
            self.records.append(self.snapshot(model, 0, "input", "baseline", 0.0))
            self.cache.store_records(base_key, self.records[-1:])
        self.emit(self.records[-1])

    def replay(self, step: int, s) -> nn.Module | None:
        """Enter the step; the stage's model and records from the cache when it holds them, else None."""
        self.ctx.step, self.ctx.stage, self.ctx.stage_record = step, s.name, {}
        self.key = cache.stage_key(
            self.key, step, s.name, s.type, s.config.model_dump(mode="json"), cache.stage_source(s.cls)
        )
        self.current = []
        restored = self.initial.restore() if self.initial is not None else None  # another job may have stored it
        replay = self.cache.claim(self.key, restored) if restored is not None and s.cls.replayable(s.config) else None
        if replay is not None and not self.cache.restore_outputs(self.key, s.cls.writes, self.run_dir):
            replay = None  # the files it wrote into the run directory are lost: computed again
        self.hit = replay is not None
        log.info("[%d/%d] %s (%s)%s", step, len(self.steps), s.name, s.type, " from cache" if self.hit else "")
        if not self.hit:
            return None
        self.current = [{**r, "cached": True} for r in replay]
        for r in self.current:
            self.emit(r)
        return restored.to(self.ctx.device)

    def execute(self, step: int, s, model: nn.Module) -> nn.Module:
        """Run the stage, seeded; the time it took less its epochs' evaluations is its work."""
        self.settle_reference()
        if s.type != "export":  # it moves no weight: zeros a grid left unpinned stay so (lwpipe.grid.pin_zeros)
            pin_deferred(model)
        torch.manual_seed(stage_seed(self.top.seed, step, s.name))
        self.stage_start, self.overhead = time.perf_counter(), 0.0
        model = s.cls(s.config).run(model, self.ctx)
        self.seconds = time.perf_counter() - self.stage_start - self.overhead  # the stage's own work
        self.work_seconds += self.seconds
        return model

    def after_stage(self, step: int, s, model: nn.Module) -> None:
        """The reference, a teacher's snapshot, the stage_end record (stored in the cache) and the checkpoint."""
        self.compressed = self.compressed or order.compresses(s.cls)
        if not self.compressed:  # still uncompressed: this is the reference the compressed model is held to
            self.pending = (model, self.steps[step:])
        if s.name in self.teachers:
            self.ctx.snapshots[s.name] = clone(model).eval()
        if not self.hit:
            self.settle_reference()
            rec = self.snapshot(model, step, s.name, "stage_end", self.seconds, type=s.type, **self.ctx.stage_record)
            self.current.append(rec)
            warn_if_larger(s, self.records[-1], rec)
            files = {n: self.run_dir / n for n in s.cls.writes if (self.run_dir / n).is_file()}
            encoded = self.encoded_file if self.encoded_step == step else None
            self.cache.store(self.key, model, self.current, encoded, files)  # first: a logged stage_end
            self.emit(rec)  # is resumable
        self.records.append(self.current[-1])
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        path = self.run_dir / "checkpoints" / f"{step:02d}_{s.name}.safetensors"
        if not self.cache.copy_state(self.key, path):  # the entry's file: byte-identical in every run
            checkpoint.save_state(model, path)

    def artifact(self, model: nn.Module, path: Path) -> int:
        """Write model.lwp to `path`; its length. The last stage_end already encoded this very model (its
        file is moved there); from the cache, its entry holds that encoding (copied when it still matches)."""
        step, self.encoded_step = self.encoded_step, None
        if step == len(self.steps) and self.encoded_file.is_file():
            os.replace(self.encoded_file, path)
            return path.stat().st_size
        if self.hit and self.steps and self.cache.copy_file(self.key, ".lwp", path):
            return path.stat().st_size
        return self.encode(model, path)

    def encode(self, model: nn.Module, path: Path) -> int:
        """Write `model` as model.lwp to `path` (the builder's rebuild description, and whether its layers were
        shrunk); the file's length."""
        return write_encoded(model, self.ctx.model_config, path, resized(model, self.built_shapes))

    def finish(self, model: nn.Module) -> dict:
        """model.lwp (verified), the loggers' files, then summary.json, written last; returns the final record."""
        final = {**self.records[-1], "event": "final"}
        if self.top.artifact:  # before summary.json: a finished run has its artifact
            size = self.artifact(model, self.run_dir / "model.lwp")
            save_tokenizer(self.ctx.data, self.run_dir)
            final.update(size_metrics(size, self.records[0]["dense_bytes"]))
            verify_artifact(self.run_dir / "model.lwp", model)
        summary = {
            "recipe": self.top.name,
            "seed": self.top.seed,
            "baseline": self.records[0],
            "stages": self.records[1:],
            "final": final,
            "seconds": time.perf_counter() - self.started,
            "stage_seconds": self.work_seconds,
        }
        for lg in self.loggers:  # what loggers write into the run directory (report.png), before summary.json
            getattr(lg, "finish", lambda _: None)(summary)
        provenance.record_peak_rss(self.run_dir)  # run_info.json's peak_rss_bytes: the process's peak so far
        text = json.dumps(summary, indent=2)
        checkpoint.atomic_write(self.run_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
        return final

    def close(self) -> None:
        self.encoded_file.unlink(missing_ok=True)  # a step's encoding: model.lwp only once the run verified it
        self.cache.release()  # a stage that failed: jobs waiting for it compute it themselves
        if self.initial is not None:
            self.initial.close()
        for lg in self.loggers:
            lg.close()


def warn_if_larger(s, before: dict, after: dict) -> None:
    """A compression stage whose model.lwp is larger than the one before it gained nothing (share.bits=16)."""
    larger = after.get("compressed_bytes", 0) > before.get("compressed_bytes", float("inf"))
    if order.compresses(s.cls) and larger:
        log.warning(
            "stage %s made model.lwp larger: %s -> %s bytes; its settings buy nothing here",
            s.name,
            f"{before['compressed_bytes']:,}",
            f"{after['compressed_bytes']:,}",
        )


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference: an eval-mode copy whose parameters take no gradients."""
    ref = clone(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
