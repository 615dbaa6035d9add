"""The training engine shared by pre-training and fine-tuning: it owns a whole run.

``run(task, cfg, run_dir)`` decides the run directory (fresh / resume / refuse), seeds, builds the
task's model, reports it, builds the DeepSpeed engine, resumes, runs the step loop (gradient
accumulation, exact resume, preemption signals, non-finite losses, periodic evaluation) and ends
the process with an exit status that says what happened. A :class:`Task` supplies what differs.

Modules: ``distributed`` (process group, clean exit), ``checkpoint`` (exact resume), ``batching``
(the global batch over processes), ``loop`` (the steps), ``schedules`` (learning rates), ``optim``
(parameter groups, DeepSpeed), ``streams`` (what the loop reads), ``health`` (non-finite losses),
``runlock`` (one run per directory), ``signals`` (preemption). Fine-tuning and pre-training import the names below only.
"""
from pretrain.engine.batching import Batching, resolve_batching
from pretrain.engine.checkpoint import Checkpointer, CheckpointWriteError, ResumeError, frozen_fingerprint, seed_step
from pretrain.engine.distributed import (average_over_ranks, batchnorm_statistics, finish, free_port,
                                         init_distributed, launched_world_size, threads_per_process)
from pretrain.engine.health import HealthPolicy
from pretrain.engine.loop import (EXIT_PREEMPTED, LoopSpec, Process, frozen_reference, new_state, prepare_run_dir,
                                  resume_state, run_entry_point, train_steps, weights_for_evaluation)
from pretrain.engine.optim import (build_engine, deepspeed_config, engine_input, hold_gated_groups, param_groups,
                                   set_lr, spared_from_decay)
from pretrain.engine.run import run
from pretrain.engine.runlock import FolderBusy
from pretrain.engine.schedules import lr_at, milestone_steps, poly_lr_at, step_lr_at
from pretrain.engine.signals import StopSignals, ignore_preemption_signals
from pretrain.engine.streams import DataError, EpochLoader, PlanError, ResumableStream
from pretrain.engine.task import Task, TrainingPlan, training_inputs

__all__ = [
    "Batching", "Checkpointer", "CheckpointWriteError", "DataError", "EXIT_PREEMPTED", "EpochLoader", "HealthPolicy",
    "LoopSpec", "PlanError", "Process", "ResumableStream", "ResumeError", "FolderBusy", "StopSignals", "Task",
    "TrainingPlan",
    "average_over_ranks",
    "batchnorm_statistics", "build_engine", "deepspeed_config", "engine_input", "finish", "free_port",
    "frozen_fingerprint",
    "frozen_reference", "hold_gated_groups", "ignore_preemption_signals", "init_distributed", "launched_world_size",
    "lr_at", "new_state",
    "milestone_steps", "param_groups", "poly_lr_at", "prepare_run_dir", "resolve_batching", "resume_state", "run",
    "run_entry_point",
    "step_lr_at",
    "seed_step", "set_lr", "spared_from_decay", "threads_per_process", "train_steps", "training_inputs",
    "weights_for_evaluation",
]
