"""The training loop shared by pre-training and fine-tuning.

A task supplies the model's forward + loss for a batch, its learning-rate schedule and optional
per-step hooks; this module owns the run directory (resume / fresh / refuse), the step loop with
gradient accumulation, exact resume from checkpoints, preemption signals, the JSONL + TensorBoard
log and the progress bar, identically for every task.

Batches come from an :class:`~pretrain.engine.streams.EpochLoader` (see that module for what a
batch holds).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from data_tools.command import EXIT_INTERRUPTED
from data_tools.config import config_changes, equal_but_for, save_resolved
from pretrain.backbone_meta import WeightsError
from data_tools.files import sha256_file, storage_problem, trim_jsonl
from pretrain.engine import runlock
from pretrain.engine.batching import BATCHING_KEYS, Batching, layout_problem, saved_batching
from pretrain.engine.checkpoint import (Checkpointer, CheckpointWriteError, ResumeError, frozen_fingerprint,
                                        seed_step)
from pretrain.engine.distributed import average_over_ranks, barrier, batchnorm_statistics
from pretrain.engine.health import HealthPolicy, StepHealth, faulty_steps, step_verdict
from pretrain.engine.optim import group_layout_problem, set_lr
from pretrain.engine.signals import EvaluationStopped, StopSignals
from pretrain.engine.streams import DataError, PlanError, loader_worker_death

if TYPE_CHECKING:
    from pretrain.engine.task import Task

FAULT_ENV = "IRPT_FAULT_SIGKILL_AFTER_STEP"  # fault injection for the resume tests
EVAL_STOP_FAULT_ENV = "IRPT_FAULT_SIGINT_DURING_EVAL_AT_STEP"  # Ctrl-C after the first frame of that evaluation


# --- run directory ----------------------------------------------------------------------------

# How the data is loaded, not what is learned: a resume may change them (fewer loader workers after
# one died of memory), as it may split the same global batch otherwise (BATCHING_KEYS, checked when
# the checkpoint is read); every other setting of a run is its own.
LOADING_KEYS = ("data.num_workers", "data.prefetch_factor", "data.pin_memory")
RESUMABLE_KEYS = LOADING_KEYS + BATCHING_KEYS


def _run_dir_decision(run_dir: Path, overwrite: bool, cfg_hash: str, cfg: Any = None) -> tuple[str, str | None]:
    """('resume' | 'fresh' | 'wipe', error or None) for a run directory; ``cfg``: this run's config,
    to name what differs from a run of another config."""
    saved = _saved_hash(run_dir)
    if Checkpointer(run_dir / "checkpoints").has_checkpoints() and not overwrite:
        if saved != cfg_hash and cfg is not None and equal_but_for(run_dir / "config.yaml", saved, cfg, RESUMABLE_KEYS):
            return "resume", None  # started before some settings existed, or now loading its data otherwise
        if saved != cfg_hash:
            changes = config_changes(run_dir / "config.yaml", cfg) if cfg is not None else []
            said = f": {'; '.join(changes)}" if changes else ""
            return "resume", (f"{run_dir} holds a run of another config (hash {saved} != {cfg_hash}){said}; "
                              "use another --run-dir, or --overwrite to discard it")
        return "resume", None
    if run_dir.is_dir() and any(p.name != runlock.LOCK_NAME for p in run_dir.iterdir()):
        if saved == cfg_hash:
            return "wipe", None  # this config's run that stopped before its first checkpoint: nothing to keep
        if saved is not None and not _logged_a_step(run_dir):
            return "wipe", None  # a start of ours that failed before its first step: it claims nothing
        if not overwrite:
            return "fresh", (f"{run_dir} is not empty and has no checkpoint to resume from; "
                             "pass --overwrite to start fresh there")
        return "wipe", None
    return "fresh", None


def _saved_hash(run_dir: Path) -> str | None:
    """The config hash a run directory's run was started with (None: no run started there)."""
    hash_file = run_dir / "config_hash.txt"
    return hash_file.read_text().strip() if hash_file.is_file() else None


def _logged_a_step(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def prepare_run_dir(run_dir: Path, overwrite: bool, cfg: Any, cfg_hash: str, rank: int) -> tuple[bool, str]:
    """Rank 0 takes the run directory's lock (held until the process ends), decides (resume,
    start fresh, or refuse) and tells every rank, before anything is written, so that no rank sees
    another's new files. Returns (resuming, the run's config hash): ``cfg_hash``, or the saved
    one of a run started by an earlier version of the toolkit, whose checkpoints carry it."""
    decision: list = [None]
    if rank == 0:
        try:
            note = runlock.acquire(run_dir)
            if note:
                print(f"note: {note}", flush=True)
            action, error = _run_dir_decision(run_dir, overwrite, cfg_hash, cfg)
            run_hash = cfg_hash
            if action == "resume" and not error:
                run_hash = _saved_hash(run_dir) or cfg_hash
                if run_hash != cfg_hash:
                    print(f"note: {run_dir} goes on with settings that differ from its start but not what it learns "
                          "(how its data is loaded or its global batch split, or settings this toolkit added since it "
                          "started): "
                          f"{'; '.join(config_changes(run_dir / 'config.yaml', cfg))}", flush=True)
            decision = [(action, error, run_hash)]
        except runlock.FolderBusy as e:
            decision = [("busy", str(e), cfg_hash)]
    dist.broadcast_object_list(decision, src=0)
    action, error, run_hash = decision[0]
    if error:
        raise ResumeError(error)
    if rank == 0 and action != "resume":
        if action == "wipe":  # everything but the lock we hold
            for p in run_dir.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.name != runlock.LOCK_NAME:
                    p.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir)
        (run_dir / "config_hash.txt").write_text(cfg_hash + "\n")
    barrier()
    return action == "resume", run_hash


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; the same command resumes


def run_entry_point(body, *args) -> None:
    """Run ``body(rank, world, device, *args)`` in an initialised process group and end the
    process: 0 on success, 75 when ``body`` returns False (stopped by a preemption signal or a
    Ctrl-C after saving: a wrapper can tell "rerun me" from "done" without reading files), 130
    when interrupted without saving (Ctrl-C twice), 1 on any error (a failed rank must not wait in
    a barrier)."""
    from pretrain.engine import finish, init_distributed

    rank, world, device = init_distributed()
    if rank == 0:
        print(f"{world} process(es) ({dist.get_backend()}), {torch.get_num_threads()} CPU threads each")
    threading.excepthook = _storage_errors_said_by_the_main_thread
    try:
        finished = body(rank, world, device, *args)
    except KeyboardInterrupt:  # Ctrl-C twice, or once before the steps began
        _exit_after_error("interrupted: the steps since the last checkpoint are lost; the same command resumes "
                          "from it (or starts again if none was written)", EXIT_INTERRUPTED)
    except Exception as e:
        message = said_error(e)
        if message is None:  # a bug: its traceback
            import traceback
            message = traceback.format_exc().rstrip()
        _exit_after_error(message)
    runlock.release_all()
    finish(EXIT_PREEMPTED if finished is False else 0)


USER_ERRORS = (ResumeError, CheckpointWriteError, FloatingPointError, PlanError, DataError, WeightsError)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")  # gloo, when another rank's process ended


def said_error(e: BaseException) -> str | None:
    """The one line that says ``e`` when it is the user's to act on (a setting, the data, the
    machine's memory or disk), without a traceback; None for anything else (a bug: its traceback)."""
    if isinstance(e, USER_ERRORS):
        return f"error: {_without_worker_traceback(e)}"
    if (died := loader_worker_death(e)) is not None:
        return (f"error: a data-loader worker process died, perhaps for memory (PyTorch: {died.rstrip('. ')}). "
                "The same command resumes from the last checkpoint, also with fewer data.num_workers, which use "
                "less (each holds batches of its own)")
    if isinstance(e, RuntimeError) and any(words in str(e) for words in PEER_LOST):
        return ("error: lost the connection to another process of this launch: it stopped (its own message says "
                "why) or the network to it failed; the same command resumes from the last checkpoint")
    if isinstance(e, OSError) and (problem := storage_problem(e)) is not None:
        return (f"error: a write failed ({problem}): free space (or give another --run-dir) and rerun the same "
                "command; it resumes from the last checkpoint")
    return None


def _without_worker_traceback(e: BaseException) -> str:
    """``e``'s own message: PyTorch re-raises a loader worker's exception with the worker's traceback
    written into the message (``Caught X in DataLoader worker process 0. Original Traceback ...``)."""
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        kind = type(e)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        text = text.rsplit(f"\n{name}: ", 1)[-1]
    return text.strip()


def _storage_errors_said_by_the_main_thread(args) -> None:
    """A background thread's full disk is not printed as a traceback: TensorBoard's writer thread
    hands its error to the main thread's next write, which says it in one line (said_error)."""
    if isinstance(args.exc_value, OSError) and storage_problem(args.exc_value) is not None:
        return
    threading.__excepthook__(args)


def _exit_after_error(message: str, code: int = 1) -> None:
    """Say ``message`` and leave at once with status ``code``. os._exit skips multiprocessing's exit
    handler, whose finalizers unlink the named semaphores of the loader workers' queues: run them
    first, or its resource tracker reports them as leaked after the message."""
    from multiprocessing import util

    print(message, file=sys.stderr)
    runlock.release_all()
    util._run_finalizers(0)  # exit priority >= 0: the semaphores' unlinking, not the queues' joins
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class Process:
    """Where this process of the launch runs."""
    rank: int
    world: int
    device: torch.device
    run_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --- logging ----------------------------------------------------------------------------------

class MetricsLog:
    """JSONL metrics (rank 0) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool, name: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = run_dir / name
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():  # drop records of steps the resumed run will redo
            trim_jsonl(self.path, lambda r: r.get("step", 0) <= resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except Exception as e:  # TensorBoard is optional at run time
            print(f"warning: no TensorBoard logging ({e})", file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", disable=not enabled or not sys.stderr.isatty(), desc=desc)


# --- the loop ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoopSpec:
    total_steps: int
    steps_per_epoch: int
    batching: Batching
    seed: int
    num_workers: int
    log_every: int
    save_every: int
    record_samples: bool = False
    desc: str = "train"
    health: HealthPolicy = field(default_factory=HealthPolicy)
    eval_every: int = 0  # evaluate every n steps and at the end (0: never inside the loop)
    best_metric: str | None = None  # the evaluation metric (higher is better) that picks the ``best`` checkpoint


def new_state(num_workers: int) -> dict:
    return {"step": 0, "epoch": 0, "batch": 0, "positions": [0] * max(num_workers, 1), "samples_seen": 0,
            "bad_samples": 0, "bad_shards": 0, "bad_shard_names": [], "nonfinite_steps": 0,
            "nonfinite_consecutive": 0, "loss_spikes": 0, "loss_history": []}


def note_bad_shards(state: dict, urls: list[str], rank: int) -> None:
    """Count each unreadable or truncated shard once, however often it is read (every pass of
    every epoch), name it once, and keep the names with the run's state."""
    names = state.setdefault("bad_shard_names", [])
    for url in urls:
        if url not in names:
            names.append(url)
            print(f"warning: rank {rank}: shard {url} is unreadable or truncated; its samples are skipped",
                  file=sys.stderr, flush=True)
    state["bad_shards"] = len(names)


def frozen_reference(model: torch.nn.Module, init_checkpoint: str | None) -> dict:
    return {"fingerprint": frozen_fingerprint(model), "init_checkpoint": init_checkpoint,
            "init_sha256": sha256_file(init_checkpoint) if init_checkpoint else None}


def _check_checkpoint(saved: dict, cfg_hash: str, frozen_ref: dict) -> None:
    if saved["config_hash"] != cfg_hash:
        raise ResumeError("the checkpoint's config hash differs from this config")
    if saved["frozen"]["fingerprint"] != frozen_ref["fingerprint"]:
        raise ResumeError(f"frozen weights differ from the checkpoint's reference {saved['frozen']} "
                          "(was the init checkpoint changed or modified?)")


def resume_state(ckpt: Checkpointer, engine, rank: int, batching: Batching, cfg_hash: str, frozen_ref: dict,
                 inputs: dict | None = None, groups: list[list[str]] | None = None) -> dict:
    """Load the latest checkpoint and check it belongs to this run (and, where both record it, to
    the same training data, ``inputs``, and the same optimiser group layout, ``groups``) and that
    its global batch can go on as ``batching``; returns the loop state, whose ``batching`` is the
    checkpoint's (``fit_state_to_batching`` lays it out as ``batching``)."""
    run_config = ckpt.directory.parent / "config.yaml"

    def written_with(state: dict, world: int) -> Batching:
        return saved_batching(state["data"], world, run_config)

    def problem(tag_dir: Path, state0: dict) -> str | None:  # before any state is loaded
        return (layout_problem(written_with(state0, state0["world_size"]), batching, tag_dir)
                or (group_layout_problem(state0.get("optimizer_groups"), groups) if groups is not None else None))

    saved = ckpt.load(engine, rank, check=problem)
    _check_checkpoint(saved, cfg_hash, frozen_ref)
    then = saved.get("inputs")
    if then is not None and inputs is not None and then != inputs:
        def said(d):
            return f"{d['count']} {d['what']} (sha256 {d['sha256'][:12]})"
        raise ResumeError(f"the training data differs from the checkpoint's: {said(then)} then, {said(inputs)} now. "
                          "Resume on the data the run started with, or start again with --overwrite")
    state = saved["data"]
    state["batching"] = asdict(written_with(saved, saved["world_size"]))
    if rank == 0:
        print(f"resumed from {ckpt.loaded_tag} at step {state['step']} (epoch {state['epoch']}, "
              f"micro-batch {state['batch']})", flush=True)
    return state


def weights_for_evaluation(ckpt: Checkpointer, engine, cfg_hash: str, frozen_ref: dict) -> dict:
    """Load the latest trainable weights (any number of processes) and check they belong to this
    run; returns the loop state they were saved at."""
    saved = ckpt.load(engine, rank=0, weights_only=True)
    _check_checkpoint(saved, cfg_hash, frozen_ref)
    return saved["data"]


def train_steps(task: Task, engine, optimizer, loader, ckpt: Checkpointer, state: dict, spec: LoopSpec,
                where: Process, *, checkpoint_meta: dict, evaluate: Callable[..., dict | None] | None = None) -> bool:
    """Run steps until ``spec.total_steps`` (True) or a preemption signal (False, after saving).

    Each step reseeds every generator from (seed, rank, step), sets the lr, takes ``accum``
    micro-batches and steps; a checkpoint every ``save_every`` steps, at the end and on a signal.
    With ``evaluate`` and ``spec.eval_every``: every ``eval_every`` steps and at the end, every rank
    calls ``evaluate(step, stop_requested)``; rank 0 logs its scalar metrics (``val/<name>``) and, when
    ``spec.best_metric`` improved, the checkpoint of that step (always saved) is kept as ``best``.
    A stop request during an evaluation ends it within a frame: the step is saved with its
    evaluation pending (``eval_pending`` in the state), and the resumed run evaluates it first.
    """
    run_dir, rank, device, world = where.run_dir, where.rank, where.device, where.world
    accum, workers = spec.batching.accum, spec.num_workers
    log = MetricsLog(run_dir, state["step"], rank == 0)
    samples_log = run_dir / f"samples_rank{rank}.jsonl" if spec.record_samples else None
    if samples_log is not None:  # drop steps the resumed run will redo, also in the logs of processes it lacks
        for path in [samples_log] + ([] if rank else _logs_of_ranks_from(run_dir, world)):
            if path.is_file():
                trim_jsonl(path, lambda r: r["step"] < state["step"])
    signals = StopSignals(announce=rank == 0)
    fault_step = int(os.environ.get(FAULT_ENV, "-1"))
    nan_steps = faulty_steps() if rank == 0 else set()
    health = StepHealth(spec.health, state, rank)
    bn_stats = batchnorm_statistics(engine.module)

    def save() -> None:
        ckpt.save(engine, f"step{state['step']:08d}", rank, dict(checkpoint_meta, data=state, world_size=world))

    def evaluate_step() -> tuple[bool, bool]:
        """(improved, stopped) for the evaluation after this step."""
        try:
            improved = _evaluate_now(evaluate, state, spec, log, rank, stop_poll(signals, device, rank, state["step"]))
        except EvaluationStopped:
            state["eval_pending"] = state["step"]
            return False, True
        state.pop("eval_pending", None)
        return improved, False

    if state.pop("eval_pending", None) == state["step"] and evaluate is not None and spec.eval_every:
        if rank == 0:  # the saved step whose evaluation a stop request ended
            print(f"evaluating step {state['step']} first (its evaluation was stopped)", flush=True)
        improved, stopped = evaluate_step()
        if stopped:  # the checkpoint on disk still says it is pending
            say_stopped(signals, rank, f"saved step {state['step']}, its evaluation stopped again")
            signals.restore()
            return False
        if improved:
            ckpt.keep_as_best(f"step{state['step']:08d}", rank, state["best"])

    progress = progress_bar(spec.total_steps, state["step"], rank == 0, spec.desc)
    while state["step"] < spec.total_steps:
        epoch = state["step"] // spec.steps_per_epoch
        if state["epoch"] != epoch:
            state.update(epoch=epoch, batch=0, positions=[0] * max(workers, 1))
        batches = loader.epoch(epoch, state["batch"], state["positions"] if state["batch"] else None)
        while state["step"] < spec.total_steps and state["step"] // spec.steps_per_epoch == epoch:
            step = state["step"]
            t0 = time.perf_counter()
            set_lr(optimizer, task.learning_rate(step))
            task.begin_step(step)
            seed_step(spec.seed, rank, step)
            wait, losses, keys = 0.0, [], []
            for micro in range(accum):
                tw = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - tw
                state["positions"][batch["worker"]] = batch["position"]
                state["batch"] = batch["batch"] + 1
                state["bad_samples"] += batch["bad_samples"]
                note_bad_shards(state, batch["bad_shard_urls"], rank)
                keys += batch["keys"]
                loss = task.forward(engine, batch)
                if step + 1 in nan_steps:
                    loss = loss * float("nan")
                losses.append(loss.detach())
                if micro == accum - 1:  # decided before the update, on every rank alike
                    verdict = step_verdict(losses)
                    engine.update_hold.everything = not verdict.finite
                engine.backward(loss)
                engine.step()
            engine.update_hold.everything = False
            average_over_ranks(bn_stats)
            state["step"] = step + 1
            state["samples_seen"] += spec.batching.effective
            if samples_log is not None:
                with open(samples_log, "a") as f:
                    f.write(json.dumps({"step": step, "keys": keys}) + "\n")
            # the step's number in logs and tags is the one it ends at
            if health.after_step(state["step"], verdict) == "rollback":
                _roll_back(ckpt, engine, rank, state["step"])
            elapsed = time.perf_counter() - t0
            progress.update(1)
            if state["step"] % spec.log_every == 0 or state["step"] == spec.total_steps or not verdict.finite:
                log.write(_step_record(task, verdict, state, optimizer, spec, elapsed, wait, device))
            task.end_step(state["step"])
            evaluated = improved = stopped_in_eval = False
            if evaluate is not None and spec.eval_every and (state["step"] % spec.eval_every == 0
                                                            or state["step"] == spec.total_steps):
                evaluated = True
                improved, stopped_in_eval = evaluate_step()
            stop = stopped_in_eval or signals.any_rank_requested(device)
            if state["step"] % spec.save_every == 0 or state["step"] == spec.total_steps or stop or evaluated:
                save()
                if improved:
                    ckpt.keep_as_best(f"step{state['step']:08d}", rank, state["best"])
            if state["step"] == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                evaluation = ", its evaluation stopped" if stopped_in_eval else ""
                say_stopped(signals, rank, f"saved step {state['step']}{evaluation}")
                signals.restore()
                return False
    progress.close()
    signals.restore()
    return True


def _logs_of_ranks_from(run_dir: Path, first: int) -> list[Path]:
    """The sample logs of ranks ``first`` and above (a run resumed on fewer processes)."""
    return [p for p in run_dir.glob("samples_rank*.jsonl") if int(p.stem.removeprefix("samples_rank")) >= first]


def say_stopped(signals: StopSignals, rank: int, what: str) -> None:
    if rank == 0:
        print(f"{signals.signal_name or 'stop signal'}: {what}, exiting; rerun the same command to resume", flush=True)


def stop_poll(signals: StopSignals, device: torch.device, rank: int, step: int) -> Callable[[], bool]:
    """What an evaluation after ``step`` asks before each frame: did any rank get a stop request?
    (A collective: every rank asks alike.)"""
    asked, fault = 0, rank == 0 and os.environ.get(EVAL_STOP_FAULT_ENV) == str(step)

    def requested() -> bool:
        nonlocal asked
        asked += 1
        if fault and asked == 2:  # fault injection: Ctrl-C after the evaluation's first frame
            os.kill(os.getpid(), signal.SIGINT)
        return signals.any_rank_requested(device)
    return requested


def _evaluate_now(evaluate: Callable[..., dict | None], state: dict, spec: LoopSpec, log: MetricsLog,
                  rank: int, stop_requested: Callable[[], bool]) -> bool:
    """Evaluate after this step; True on rank 0 when ``spec.best_metric`` beat every earlier value.
    The best value so far travels in the state (so in checkpoints: a resumed run compares with it)."""
    metrics = evaluate(state["step"], stop_requested)
    if rank != 0 or metrics is None:
        return False
    log.write({"step": state["step"], **{f"val/{k}": v for k, v in metrics.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    if spec.best_metric is None:
        return False
    if metrics.get(spec.best_metric) is None:  # not defined on this split (a detection split without objects)
        return False
    value = float(metrics[spec.best_metric])
    best = state.setdefault("best", {})
    if "value" in best and not value > best["value"]:
        return False
    best.update(metric=spec.best_metric, value=value, step=state["step"])
    return True


def _roll_back(ckpt: Checkpointer, engine, rank: int, step: int) -> None:
    """Trainable weights and optimiser state of the newest good checkpoint; the step counter and
    the data position go on (the batches since that checkpoint are not seen again)."""
    if not ckpt.has_checkpoints():
        raise FloatingPointError(f"non-finite loss at step {step} and no checkpoint yet to roll back to "
                                 "(train.nonfinite=rollback): lower the learning rate or save earlier")
    ckpt.load(engine, rank)
    if rank == 0:
        print(f"rolled back to {ckpt.loaded_tag}; going on at step {step} with the next data", flush=True)


def _step_record(task: Task, verdict, state, optimizer, spec: LoopSpec, elapsed, wait, device) -> dict:
    record = {"step": state["step"], "epoch": state["epoch"], "loss": verdict.loss,
              "lr": max(g["lr"] for g in optimizer.param_groups),
              "images_per_s": spec.batching.effective / max(elapsed, 1e-9),
              "data_wait_fraction": wait / max(elapsed, 1e-9),
              "samples_seen": state["samples_seen"], "bad_samples": state["bad_samples"],
              "bad_shards": state["bad_shards"], "nonfinite_steps": state["nonfinite_steps"],
              "loss_spikes": state["loss_spikes"]}
    if device.type == "cuda":
        record["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    record.update(task.log_fields())
    return record
