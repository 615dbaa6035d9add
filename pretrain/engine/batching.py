"""How a run's batches are laid out over processes, and a resume onto another layout.

The global batch (per-process micro-batch x accumulation x processes) is what a run learns with:
MAE's learning rate scales with it and every task's schedule counts its steps. How it is split is
not: a run killed on 8 GPUs may resume on 4 (a lost node, a smaller allocation) with twice the
accumulation, as MAE's own resume allows, provided the optimiser state was not split among the
processes that wrote it (ZeRO stages >= 1 partition it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from pretrain.engine.streams import PlanError

# How the global batch is split among processes and micro-batches: a resume may change these as
# long as the global batch stays the same.
BATCHING_KEYS = ("train.batch_size", "train.accum_steps", "train.effective_batch")
# DeepSpeed's optimiser state files, one per process, of ZeRO stages >= 1 (its bf16 ones too).
PARTITIONED_STATE_MARK = "zero_pp_rank_"


@dataclass(frozen=True)
class Batching:
    micro: int  # per process
    accum: int
    world: int

    @property
    def effective(self) -> int:
        return self.micro * self.accum * self.world

    def said(self) -> str:
        return f"{self.effective} = {self.micro} x {self.accum} accumulation x {self.world} processes"


def resolve_batching(t, world: int) -> Batching:
    """``train.batch_size`` per process; ``train.effective_batch`` (if set) fixes the accumulation."""
    micro, accum = int(t.batch_size), int(t.accum_steps)
    if t.effective_batch:
        if t.effective_batch % (micro * world):
            raise PlanError(f"effective_batch {t.effective_batch} is not a multiple of batch_size {micro} x "
                             f"{world} processes")
        accum = t.effective_batch // (micro * world)
    return Batching(micro, accum, world)


def saved_batching(state: dict, world: int, run_config: Path) -> Batching:
    """The layout a checkpoint's ``state`` was written with (``world``: its process count). A
    checkpoint of a version that did not record it was written with the run's own config: no
    resume could change the batching then."""
    if "batching" in state:
        return Batching(**state["batching"])
    return resolve_batching(OmegaConf.load(run_config).train, world)


def layout_problem(then: Batching, now: Batching, tag_dir: Path) -> str | None:
    """Why a checkpoint written with ``then`` (in ``tag_dir``) cannot go on as ``now`` (None: it can)."""
    if then.effective != now.effective:
        return (f"the checkpoint's global batch is {then.said()}, this run's {now.said()}: resume with the same "
                f"global batch (train.effective_batch={then.effective} sets the accumulation for any number of "
                f"processes whose train.batch_size x processes divides it)")
    if then.world != now.world and any(PARTITIONED_STATE_MARK in p.name for p in tag_dir.iterdir()):
        return (f"the checkpoint was written by {then.world} processes with the optimiser state split among them "
                f"(train.zero_stage >= 1), this run has {now.world}: resume with "
                f"{then.world} processes")
    return None


def fit_state_to_batching(state: dict, then: Batching, now: Batching, steps_per_epoch: int, workers: int,
                          needs_positions: bool) -> str | None:
    """Make a resumed ``state`` (written with ``then``) go on with ``now``. The global batch is the
    same, so the schedule and the steps per epoch are too; the data position moves to the same step
    of the epoch in the new layout's micro-batches. A map-style stream then reads exactly the frames
    an uninterrupted run reads at each step (its epoch order does not depend on the layout); a
    stream that needs per-worker positions (the shards) starts the new processes' streams afresh.
    Returns a note saying what changed (None: nothing), and when the samples the rest of the
    epoch reads change."""
    state["batching"] = asdict(now)
    if then == now:
        return None
    epoch = state["step"] // steps_per_epoch
    batch = (state["step"] - epoch * steps_per_epoch) * now.accum
    state.update(epoch=epoch, batch=batch, positions=[0] * max(workers, 1))
    note = f"the checkpoint's global batch {then.said()} goes on as {now.said()}"
    if batch and needs_positions:
        note += (f"; the rest of epoch {epoch} is read from the start of the new streams, not in the order an "
                 "uninterrupted run reads it")
    return note


def fit_positions_to_workers(state: dict, workers: int, needs_positions: bool) -> str | None:
    """A resume with another ``data.num_workers`` (LOADING_KEYS): the saved per-worker stream
    positions belong to the old count, so each new worker starts its stream afresh. Returns a note
    when that changes which samples the rest of the epoch reads (a stream that needs positions,
    resumed inside an epoch)."""
    before, now = len(state["positions"]), max(workers, 1)
    if before == now:
        return None
    state["positions"] = [0] * now
    if state["batch"] and needs_positions:
        return (f"data.num_workers changed ({before} -> {now} loader streams): the rest of epoch {state['epoch']} is "
                "read from the start of the new workers' streams, not in the order an uninterrupted run reads it")
    return None


def fit_positions_to_stream_order(state: dict, version: int, needs_positions: bool) -> str | None:
    """A resume by a toolkit whose stream deals its samples to the loader streams otherwise than the
    one that saved (``ResumableStream.order_version``; a checkpoint without one: 1): the saved
    positions are of the old order, so each stream starts afresh. Records ``version`` in ``state``;
    returns a note where the rest of an epoch then reads other samples."""
    before = state.get("stream_order", 1)
    state["stream_order"] = version
    if before == version:
        return None
    state["positions"] = [0] * len(state["positions"])
    if state["batch"] and needs_positions:
        return (f"this version of the toolkit deals the samples to its loader streams otherwise than the one that "
                f"saved the checkpoint (order {before} -> {version}): the rest of epoch {state['epoch']} is read from "
                "the start of the streams, not in the order an uninterrupted run reads it")
    return None


def fit_state_to_plan(state: dict, steps_per_epoch: int, total_steps: int) -> str | None:
    """A resume whose plan cuts epochs otherwise than the run's checkpoint records (a version of the
    toolkit that counts an epoch's steps otherwise: whole optimiser steps since 2026-12-05). Records the
    plan in ``state``; returns a note saying the schedule now goes on over the new length (None: the
    same plan, or a checkpoint that did not record one)."""
    then = state.get("plan")
    state["plan"] = {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    if then is None or then == state["plan"]:
        return None
    return (f"this run's epochs were {then['steps_per_epoch']} steps ({then['total_steps']} in all) when the "
            f"checkpoint was written and are {steps_per_epoch} ({total_steps}) now: the learning-rate schedule goes "
            f"on over the new length from step {state['step']}")
