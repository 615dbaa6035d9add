"""``run(task, cfg, run_dir)``: one run of any task, from the config check to the exit status."""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Callable

import torch

from data_tools.config import check_config, config_hash
from data_tools.files import atomic_write_text
from pretrain.engine.batching import (Batching, fit_positions_to_stream_order, fit_positions_to_workers,
                                      fit_state_to_batching, fit_state_to_plan, resolve_batching)
from pretrain.engine.checkpoint import Checkpointer, ResumeError
from pretrain.engine.health import HealthPolicy
from pretrain.engine.loop import (LoopSpec, Process, frozen_reference, new_state, prepare_run_dir, resume_state,
                                  run_entry_point, say_stopped, stop_poll, train_steps, weights_for_evaluation)
from pretrain.engine.signals import EvaluationStopped, StopSignals
from pretrain.engine.optim import build_engine, deepspeed_config, group_layout
from pretrain.engine.task import Task
from pretrain.random_init import rebuilding_trained_run


def check_init_checkpoint(cfg) -> None:
    """Refuse an ``init.checkpoint`` that is not there, a folder, or an export whose JSON cannot be
    read, before the run directory is touched (and in ``finetune check``), in one line without a
    traceback."""
    init = cfg.get("init", {}).get("checkpoint")
    if init and not Path(init).exists():
        raise FileNotFoundError(f"init.checkpoint {init}: no such file")
    if init and Path(init).is_dir():
        from pretrain.weights import weights_folder_problem
        raise FileNotFoundError(f"init.checkpoint: {weights_folder_problem(Path(init))}")
    from pretrain.backbone_meta import is_exported_backbone, read_backbone_meta

    if init and is_exported_backbone(init):  # an export's JSON: cut short, too new, lacking a key
        read_backbone_meta(init)


def run(task: Task, cfg, run_dir: str | Path, overwrite: bool = False, eval_only: bool = False) -> None:
    """Check ``cfg`` against the task's schema (before the run directory is touched), then train
    (resuming whatever the run directory holds) and evaluate in every process of the launch, and
    end the process: 0 done, 75 stopped by a signal after saving (rerun to resume), 1 error.
    ``eval_only``: evaluate the latest checkpoint with any number of processes, without training."""
    if task.schema is not None:
        check_config(cfg, task.schema)
    check_init_checkpoint(cfg)
    task.check_inputs(cfg, eval_only)
    run_entry_point(functools.partial(_run_process, task=task, eval_only=eval_only), cfg, Path(run_dir), overwrite)


def _run_process(rank: int, world: int, device: torch.device, cfg, run_dir: Path, overwrite: bool, *,
                 task: Task, eval_only: bool) -> bool:
    """False when a preemption signal stopped training (after saving)."""
    t = cfg.train
    where = Process(rank, world, device, run_dir)
    cfg_hash = config_hash(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", int(t.keep_last))
    if eval_only and overwrite:
        raise ResumeError("--eval-only and --overwrite exclude each other")
    if eval_only and ckpt.latest_tag() is None:  # refused before anything is written
        raise ResumeError(f"--eval-only needs a trained run in {run_dir} (no checkpoint there)")
    resume, cfg_hash = prepare_run_dir(run_dir, overwrite, cfg, cfg_hash, rank)  # a run keeps its own hash

    torch.manual_seed(int(t.seed))  # identical initialisation on every rank
    with rebuilding_trained_run() if eval_only else contextlib.nullcontext():  # its weights are loaded next
        model = task.build_model(cfg, where)
    task.describe_model(model, cfg, where)
    if task.sync_batchnorm and world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    frozen_ref = frozen_reference(model, cfg.init.checkpoint)  # of the weights as built, as an export rebuilds them
    if t.precision == "bf16":  # weights and buffers: DeepSpeed's bf16 casts parameters only (from 0.18),
        model.to(torch.bfloat16)  # and a BatchNorm with bf16 weights and fp32 running statistics raises
    meta = {"config_hash": cfg_hash, "frozen": frozen_ref}

    batching = resolve_batching(t, world)
    plan = None if eval_only else task.training_plan(model, cfg, batching, where)
    if plan is not None:
        plan.check(batching.accum, task.name)
    ds_cfg = deepspeed_config(batching.micro, batching.accum, world, t.precision, t.zero_stage, t.grad_clip)
    groups = task.param_groups(model, cfg)
    meta["optimizer_groups"] = group_layout(groups)  # what a resume matches the saved AdamW state by
    engine, optimizer = build_engine(model, groups, tuple(cfg.optim.betas), ds_cfg)  # one optim: section for every task

    if eval_only:
        state = weights_for_evaluation(ckpt, engine, cfg_hash, frozen_ref)
        if rank == 0:
            print(f"evaluating {ckpt.latest_tag()} (step {state['step']}) with {world} processes", flush=True)
        return _finish(task, model, cfg, where, state)

    workers = int(cfg.data.num_workers)
    if plan.inputs is not None:
        meta["inputs"] = plan.inputs
    state = resume_state(ckpt, engine, rank, batching, cfg_hash, frozen_ref, plan.inputs,
                         meta["optimizer_groups"]) if resume else \
        new_state(workers)
    written_with = Batching(**state["batching"]) if resume else batching  # recorded with every checkpoint
    stream = plan.loader.stream
    needs_positions = stream.needs_positions
    for note in (fit_state_to_batching(state, written_with, batching, plan.steps_per_epoch, workers, needs_positions),
                 fit_positions_to_workers(state, workers, needs_positions),
                 fit_positions_to_stream_order(state, stream.order_version, needs_positions),
                 fit_state_to_plan(state, plan.steps_per_epoch, plan.total_steps)):
        if note and rank == 0:
            print(f"note: {note}", flush=True)
    task.start(model, optimizer, plan, cfg, where)
    evaluation = Evaluation(task, model, cfg, where)
    spec = LoopSpec(total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch, batching=batching,
                    seed=int(t.seed), num_workers=workers, log_every=int(t.log_every_steps),
                    save_every=int(t.save_every_steps), record_samples=bool(t.record_samples),
                    health=HealthPolicy.from_config(t), desc=task.name, eval_every=task.eval_every(cfg),
                    best_metric=task.best_metric)
    if not train_steps(task, engine, optimizer, plan.loader, ckpt, state, spec, where, checkpoint_meta=meta,
                       evaluate=evaluation):
        return False
    return _finish(task, model, cfg, where, state, evaluation)


class Evaluation:
    """The task's evaluation as the loop calls it: the model goes back to training mode after,
    and the metrics of the last evaluated step are kept (the final report reuses them)."""

    def __init__(self, task: Task, model, cfg, where: Process):
        self.task, self.model, self.cfg, self.where = task, model, cfg, where
        self.step, self.metrics = None, None

    def __call__(self, step: int, stop_requested: Callable[[], bool] | None = None) -> dict | None:
        was_training = self.model.training
        try:
            self.metrics = self.task.evaluate(self.model, self.cfg, self.where, stop_requested)
        finally:  # also when a stop request ended it
            self.model.train(was_training)
        self.step = step
        return self.metrics

    def at(self, step: int, stop_requested: Callable[[], bool] | None = None) -> dict | None:
        """The metrics after ``step``: kept from the loop or evaluated now."""
        return self.metrics if self.step == step else self(step, stop_requested)


def _finish(task: Task, model, cfg, where: Process, state: dict, evaluation: Evaluation | None = None) -> bool:
    """Final evaluation, ``metrics.json``, ``DONE`` and the result line. False when a stop signal
    (Ctrl-C, preemption) ended the evaluation: the step it evaluates is saved, the same command
    evaluates it again."""
    signals = StopSignals(announce=where.is_main)
    try:
        metrics = (evaluation or Evaluation(task, model, cfg, where)).at(
            state["step"], stop_poll(signals, where.device, where.rank, state["step"]))
    except EvaluationStopped:
        say_stopped(signals, where.rank, f"step {state['step']} is saved, its evaluation stopped")
        return False
    finally:
        signals.restore()
    if not where.is_main:
        return True
    done = {"steps": state["step"], "samples_seen": state["samples_seen"]}
    if state.get("best"):
        done["best"] = state["best"]
    if metrics is not None:
        metrics.update(task=task.name, steps=state["step"], processes=where.world)
        atomic_write_text(where.run_dir / "metrics.json", json.dumps(metrics, indent=1))
    # whole or not there (run.sh and rerun take the run for finished by it; summaries read it)
    atomic_write_text(where.run_dir / "DONE", json.dumps(done))
    print(task.result_line(metrics, state["step"], where), flush=True)
    return True
