"""The training engine shared by pre-training and fine-tuning: distributed set-up, the DeepSpeed
engine, the learning-rate schedule, checkpoints with exact resume, preemption signals, clean exit.

Checkpoints hold only what cannot be recomputed: DeepSpeed saves the trainable parameters and the
optimiser state (``exclude_frozen_parameters``); our ``state_rank{r}.json`` adds the step, samples
seen, each rank's data position, the config hash, the world size and a sha256 of the frozen
parameters (rebuilt from the init checkpoint or the seed, and verified on load). RNG states are
not saved: every generator is reseeded from (seed, rank, step) at each step (``seed_step``). The
``latest`` pointer is replaced atomically only after every rank has finished writing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_tools.files import atomic_write_text, sha256_file
from pretrain.runlock import die_with_launcher

LATEST = "latest"


# --- distributed ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_process(env: dict, threads: int) -> int:
    """Intra-op threads for one process: torch's default for the machine (``threads``) shared
    among the processes of its node. torchrun sets OMP_NUM_THREADS=1 itself; the DeepSpeed
    launcher and srun do not, and processes that each take every core oversubscribe the machine
    and run many times slower."""
    if env.get("SLURM_CPUS_PER_TASK"):  # srun gives each task its own CPUs
        return max(1, min(threads, int(env["SLURM_CPUS_PER_TASK"])))
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or "1"
    return max(1, threads // int(local))


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed. Works under torchrun, the deepspeed
    launcher, SLURM's srun (SLURM_* variables) and as a single process without a launcher."""
    import deepspeed

    env = os.environ
    die_with_launcher(env)  # before the SLURM / single-process defaults below set LOCAL_RANK
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun: one task per process
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:  # a plain single process
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    if "OMP_NUM_THREADS" not in env:
        torch.set_num_threads(threads_per_process(env, torch.get_num_threads()))
    cuda = torch.cuda.is_available()
    local_rank = int(env.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def finish(code: int) -> None:
    """End a distributed entry point. torch/gloo can abort at interpreter shutdown after all work
    is done (pytorch issue 190489, ~3-6% of 2-process runs): barrier, destroy the group, flush and
    leave with os._exit so that no late destructor turns a finished run into a failure."""
    try:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --- optimisation -----------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up, then half-cycle cosine to ``min_lr``, as a function of the global step."""
    if step < warmup_steps:
        return base_lr * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def poly_lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, power: float = 1.0,
               min_lr: float = 0.0) -> float:
    """Linear warm-up, then polynomial decay to ``min_lr`` (mmsegmentation's schedule)."""
    if step < warmup_steps:
        return base_lr * step / max(warmup_steps, 1)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr + (base_lr - min_lr) * (1.0 - progress) ** power


def deepspeed_config(micro_batch: int, accum_steps: int, world_size: int, precision: str, zero_stage: int,
                     grad_clip: float) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch * accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16_autocast":  # fp32 weights, bf16 matmuls (MAE's recipe, without fp16 NaNs)
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "bf16":  # bf16 weights with fp32 master copies in the optimiser
        cfg["bf16"] = {"enabled": True}
    elif precision != "fp32":
        raise ValueError(f"precision must be bf16_autocast, bf16 or fp32, got {precision!r}")
    return cfg


class UpdateHold:
    """Set ``everything`` before a step's last micro-batch to make that step's optimiser update
    a no-op on every parameter (no weight change, no AdamW state or step count): how the loop
    drops the update of a step with a non-finite loss."""

    def __init__(self):
        self.everything = False


def hold_gated_groups(optimizer: torch.optim.Optimizer, hold: UpdateHold | None = None) -> torch.optim.Optimizer:
    """Make ``optimizer`` leave every parameter group marked ``gated`` untouched (and every group
    while ``hold.everything``). DeepSpeed hands a parameter without gradient a zero gradient (to
    keep ranks in step), and AdamW would then count steps and decay it; a gated group is skipped
    as if it had no gradient at all. Step hooks rather than a subclass: DeepSpeed's ZeRO accepts
    only the optimiser classes it knows, and its own loss-scale skip exists for fp16 only."""
    held: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def before(opt, args, kwargs):
        everything = hold is not None and hold.everything
        held[:] = [(p, p.grad) for g in opt.param_groups if everything or g.get("gated") for p in g["params"]]
        for p, _ in held:
            p.grad = None  # AdamW skips parameters without a gradient: no state, no decay

    def after(opt, args, kwargs):
        for p, grad in held:
            p.grad = grad
        held.clear()

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def build_engine(model: torch.nn.Module, groups: list[dict], lr: float, betas: tuple[float, float], ds_cfg: dict):
    """DeepSpeed engine around ``model`` with a torch AdamW (no extension to compile). A group
    with a ``gate`` name keeps it (and ``gated``, False until a task closes the gate);
    ``engine.update_hold`` drops a whole step's update."""
    import deepspeed

    opt_groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": lr,
                   "lr_scale": g.get("lr_scale", 1.0), "gate": g.get("gate"), "gated": False} for g in groups]
    hold = UpdateHold()
    optimizer = hold_gated_groups(torch.optim.AdamW(opt_groups, lr=lr, betas=tuple(betas)), hold)
    params = [p for g in groups for p in g["params"]]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg,
                                                   model_parameters=params)
    engine.update_hold = hold
    return engine, optimizer


def batchnorm_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """The running mean / var buffers of every plain BatchNorm of ``model``. Plain BatchNorm
    (IV-tuning's hybrid operation, the heads) keeps per-rank statistics and DeepSpeed does not
    sync buffers, so ranks would evaluate different models and only rank 0's would be saved.
    SyncBatchNorm (CUDA) needs no help; gloo on CPU has none, so the loop averages these over
    ranks after every step (:func:`average_over_ranks`): ranks then hold one model at every step
    boundary (save, resume, evaluation), for one small all-reduce per step. Loading a checkpoint
    copies into these same tensors."""
    return [b for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]


def average_over_ranks(stats: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in one all-reduce."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 or not stats:
        return
    flat = torch.cat([b.detach().float().reshape(-1) for b in stats])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for b in stats:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --- determinism ------------------------------------------------------------------------------

def seed_step(seed: int, rank: int, step: int) -> None:
    """Reseed every generator from (seed, rank, step): masking and dropout are then a function of
    the step alone, which makes resume exact without replaying anything."""
    value = int(np.random.default_rng([seed, rank, step]).integers(2**62))
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes and bytes of every frozen parameter and buffer."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            t = p.detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- checkpoints ------------------------------------------------------------------------------

class ResumeError(RuntimeError):
    pass


CHECKSUMS = "checksums.json"
DISK_FULL_FAULT_ENV = "IRPT_FAULT_DISK_FULL_AT_STEP"  # fault injection: rank 0's save fails as on a full disk


class CheckpointWriteError(OSError):
    pass


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6 if path.is_dir() else 0.0


def _weights_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint reads, with ``weights_only=True``: a checkpoint file is data, never
    code (DeepSpeed's own loader unpickles anything)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ResumeError(f"refused to load {path}: it holds more than tensors and plain data, which "
                          f"could run code ({str(e).splitlines()[0]}); delete it or the checkpoint folder") from None


@dataclass
class Checkpointer:
    """Checkpoints in ``directory/stepNNNNNNNN``, ``latest`` naming the newest complete one.

    Every file of a checkpoint is listed with its sha256 in ``checksums.json``, written after all
    ranks finished writing and before ``latest`` moves. Loading verifies the latest checkpoint and
    falls back to the newest one that verifies (``keep_last`` are kept for this), saying which it
    skipped and why; files are read with ``weights_only=True``."""

    directory: Path
    keep_last: int = 3

    def latest_tag(self) -> str | None:
        pointer = self.directory / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def tags(self) -> list[str]:
        """Checkpoint folders, newest first."""
        if not self.directory.is_dir():
            return []
        return sorted((p.name for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step")),
                      reverse=True)

    def has_checkpoints(self) -> bool:
        """A ``latest`` pointer or a finished save: a folder without checksums is a first save
        that was cut short, and a run with nothing else starts again, as one with no save."""
        return self.latest_tag() is not None or any((self.directory / t / CHECKSUMS).is_file() for t in self.tags())

    def save(self, engine, tag: str, rank: int, state: dict) -> None:
        """Write checkpoint ``tag`` on every rank. Non-finite trainable weights are never written:
        every resume would start from them (the loss check fires one step after the update that
        broke them); ``latest`` keeps naming the last good checkpoint."""
        params = [p for p in engine.module.parameters() if p.requires_grad]
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        flag = torch.tensor([1.0 if finite else 0.0], device=params[0].device if params else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() < 1:
            raise FloatingPointError(f"the trainable weights are non-finite at {tag}: checkpoint not written, "
                                     f"{self.latest_tag() or 'no checkpoint'} stays the latest (lower the learning "
                                     "rate, or check the data)")
        tag_dir = self.directory / tag
        # Room first, decided by rank 0 for all (a failure inside DeepSpeed's save would leave the
        # other ranks waiting in its barrier): a full disk stops every rank with one message.
        room = torch.tensor([1.0 if rank != 0 or self._has_room(tag, params) else 0.0], device=flag.device)
        dist.all_reduce(room, op=dist.ReduceOp.MIN)
        if room.item() < 1:
            raise CheckpointWriteError(self._no_room_message(tag, params))
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, save_latest=False,
                                   exclude_frozen_parameters=True)
            tag_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(tag_dir / f"state_rank{rank}.json", json.dumps(state))
        except (OSError, RuntimeError) as e:  # e.g. the disk filled up during the save
            intact = f"previous checkpoint {self.latest_tag()} is intact" if self.latest_tag() else "no earlier checkpoint"
            raise CheckpointWriteError(f"checkpoint {tag} could not be written to {self.directory} (rank {rank}): "
                                       f"{type(e).__name__}: {e}; {intact}; rerun the same command to resume") from e
        dist.barrier()  # every rank has written everything for this tag
        if rank == 0:
            files = sorted(p.name for p in tag_dir.iterdir() if p.is_file() and p.name != CHECKSUMS)
            sums = {name: sha256_file(tag_dir / name) for name in files}
            atomic_write_text(tag_dir / CHECKSUMS, json.dumps({"world_size": dist.get_world_size(), "files": sums}))
            atomic_write_text(self.directory / LATEST, tag)
            self._prune(keep=tag)
        dist.barrier()

    def _needed_mb(self, params) -> float:
        """About what one checkpoint takes: the last one's size, or the trainable weights with
        their two AdamW moments."""
        previous = self.latest_tag()
        if previous and (self.directory / previous).is_dir():
            return _folder_mb(self.directory / previous)
        return 3 * sum(p.numel() * 4 for p in params) / 1e6

    def _free_mb(self, tag: str) -> float:
        if os.environ.get(DISK_FULL_FAULT_ENV) == tag.removeprefix("step").lstrip("0"):
            return 0.0  # fault injection: this save finds the disk full
        self.directory.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.directory).free / 1e6

    def _has_room(self, tag: str, params) -> bool:
        return self._free_mb(tag) >= self._needed_mb(params)

    def _no_room_message(self, tag: str, params) -> str:
        previous = self.latest_tag()
        intact = f"previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return (f"checkpoint {tag} could not be written to {self.directory}: no space left (needs "
                f"~{self._needed_mb(params):.0f} MB, {self._free_mb(tag):.0f} MB free); {intact}; free space, "
                "then rerun the same command to resume")

    def _prune(self, keep: str) -> None:
        tags = sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def problem(self, tag: str, world: int | None = None) -> str | None:
        """Why checkpoint ``tag`` cannot be resumed (None: complete and intact). ``world``: the
        process count whose state files must all be there (None: any)."""
        tag_dir = self.directory / tag
        if not tag_dir.is_dir():
            return "its folder is missing"
        try:
            listed = json.loads((tag_dir / CHECKSUMS).read_text())
        except FileNotFoundError:
            return f"{CHECKSUMS} is missing (the save did not finish)"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{CHECKSUMS} is not readable JSON"
        for name, digest in listed["files"].items():
            path = tag_dir / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256_file(path) != digest:
                return f"{name} does not match its sha256 (corrupted or truncated)"
        saved_world = int(listed.get("world_size", 0))
        for r in range(saved_world):
            name = f"state_rank{r}.json"
            if name not in listed["files"]:
                return f"{name} was not written"
        if world is not None and saved_world != world:
            return f"written by {saved_world} processes, this run has {world}: resume with the same number of processes"
        return None

    def choose(self, world: int | None = None) -> tuple[str, list[str]]:
        """The newest usable checkpoint (the latest first) and the reasons others were skipped."""
        latest = self.latest_tag()
        skipped = []
        if latest is not None and latest not in self.tags():
            skipped.append(f"latest names {latest!r}, which does not exist" if latest else "latest is empty")
        order = ([latest] if latest in self.tags() else []) + [t for t in self.tags() if t != latest]
        for tag in order:
            reason = self.problem(tag, world)
            if reason is None:
                return tag, skipped
            skipped.append(f"{tag}: {reason}")
        raise ResumeError(f"no usable checkpoint in {self.directory}: " + ("; ".join(skipped) or "none written")
                          + " (use --overwrite to start again)")

    def load(self, engine, rank: int, weights_only: bool = False) -> dict:
        """Load the newest verified checkpoint into ``engine`` (rank 0 decides, every rank loads
        the same one); returns this rank's saved state and sets ``self.loaded_tag``.
        ``weights_only``: the trainable weights without optimizer state, for any number of
        processes (evaluation), with rank 0's state (config hash, frozen reference)."""
        world = dist.get_world_size()
        choice: list = [None]
        if rank == 0:
            try:
                tag, skipped = self.choose(None if weights_only else world)
                for why in skipped:
                    print(f"warning: checkpoint skipped: {why}", file=sys.stderr, flush=True)
                choice = [(tag, None)]
            except ResumeError as e:
                choice = [(None, str(e))]
        dist.broadcast_object_list(choice, src=0)
        tag, error = choice[0]
        if error:
            raise ResumeError(error)
        state_path = self.directory / tag / f"state_rank{0 if weights_only else rank}.json"
        state = json.loads(state_path.read_text())
        engine.checkpoint_engine.load = _weights_only_load
        engine.load_checkpoint(str(self.directory), tag=tag, load_module_strict=False,
                               load_optimizer_states=not weights_only, load_lr_scheduler_states=False)
        self.loaded_tag = tag
        return state


# --- preemption -------------------------------------------------------------------------------

class StopSignals:
    """SIGTERM / SIGUSR1 (preemption notices) set a flag; the loop saves and stops at the next
    step, once every rank agrees (an all-reduce, so no rank is left waiting in a collective)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def any_rank_requested(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
