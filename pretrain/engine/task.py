"""What a job (pre-training, segmentation, detection) supplies to :func:`pretrain.engine.run`.

The engine owns everything a run has in common; a task says only what differs: its config
schema, model, parameter groups, training data and schedule, the forward + loss of a batch,
optional per-step hooks, evaluation and the one-line result. One instance serves one process.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from pretrain.engine.batching import Batching
from pretrain.engine.loop import Process


@dataclass(frozen=True)
class TrainingPlan:
    """The task's training data and the schedule it implies."""
    loader: object  # an EpochLoader (batches epoch after epoch, resumable)
    steps_per_epoch: int
    total_steps: int
    inputs: dict | None = None  # what the data is (training_inputs): a resume on other data is refused

    def check(self, accum: int, task: str) -> None:
        """A task's plan must not take more micro-batches per epoch than its stream yields: the
        loop would otherwise run out of data in the middle of a step."""
        need, have = self.steps_per_epoch * accum, self.loader.stream.batches_per_epoch
        if self.steps_per_epoch < 1 or need > have:
            raise RuntimeError(f"{task}: the training plan takes {self.steps_per_epoch} steps x {accum} accumulation "
                               f"= {need} micro-batches per epoch, but its data stream yields {have}")


def training_inputs(what: str, count: int, items: Iterable[str]) -> dict:
    """A record of the training data that a checkpoint keeps: ``count`` ``what`` and a digest of
    ``items`` (their names, in the order the stream reads them). Exact resume replays the data
    order from the epoch and batch position, which means nothing on other data."""
    digest = hashlib.sha256("\n".join(items).encode()).hexdigest()
    return {"what": what, "count": int(count), "sha256": digest}


class Task:
    name = "train"  # progress bar, messages, metrics.json
    schema: type | None = None  # the pydantic model the config is checked against before anything runs
    sync_batchnorm = False  # convert BatchNorm to SyncBatchNorm on multi-GPU runs
    best_metric: str | None = None  # the evaluation metric (higher is better) that picks the ``best`` checkpoint

    # --- before the run directory is touched -------------------------------------------------
    def check_inputs(self, cfg, eval_only: bool = False) -> None:
        """Refuse inputs the run cannot use (raise with one line naming them), on a config that
        fits the schema; called before the run directory is claimed (``eval_only``: the run only
        evaluates, so training's inputs are not needed)."""

    # --- set-up (called once, in this order) -------------------------------------------------
    def build_model(self, cfg, where: Process) -> nn.Module:
        """The model with its initial weights (built, then loaded: model code reads no files)."""
        raise NotImplementedError

    def describe_model(self, model: nn.Module, cfg, where: Process) -> None:
        """Rank 0: print / write what trains (the parameter report)."""

    def param_groups(self, model: nn.Module, cfg) -> list[dict]:
        raise NotImplementedError

    def training_plan(self, model: nn.Module, cfg, batching: Batching, where: Process) -> TrainingPlan:
        raise NotImplementedError

    def start(self, model: nn.Module, optimizer, plan: TrainingPlan, cfg, where: Process) -> None:
        """After the engine exists and the state is resumed, before the first step."""

    # --- every step ---------------------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        raise NotImplementedError

    def begin_step(self, step: int) -> None:
        pass

    def forward(self, engine, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch (the engine does backward and step)."""
        raise NotImplementedError

    def log_fields(self) -> dict:
        return {}

    def end_step(self, step: int) -> None:
        pass

    # --- evaluation and the end ---------------------------------------------------------------
    def eval_every(self, cfg) -> int:
        """Evaluate every n steps during training (and at the end); 0: only at the end."""
        return 0

    def evaluate(self, model: nn.Module, cfg, where: Process,
                 stop_requested: Callable[[], bool] | None = None) -> dict | None:
        """Metrics on held-out data (every rank takes part; rank 0's dict is kept), or None.
        ``stop_requested`` (during training): a collective to poll as it goes, raising
        :class:`~pretrain.engine.signals.EvaluationStopped` when it says so."""
        return None

    def result_line(self, metrics: dict | None, steps: int, where: Process) -> str:
        return f"done: {steps} steps, checkpoints in {where.run_dir / 'checkpoints'}"
