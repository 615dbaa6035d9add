"""Checkpoints with exact resume.

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
import os
import pickle
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from data_tools.files import atomic_write_text, sha256_file
from pretrain.engine.distributed import barrier

LATEST = "latest"
BEST = "best"  # the checkpoint with the best evaluation metric so far (fine-tuning with eval.every_steps)


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

RESTART_ADVICE = " (use --overwrite to start again)"  # where a run has no checkpoint to resume from


class ResumeError(RuntimeError):
    pass


CHECKSUMS = "checksums.json"
DISK_FULL_FAULT_ENV = "IRPT_FAULT_DISK_FULL_AT_STEP"  # fault injection: rank 0's save fails as on a full disk


class CheckpointWriteError(OSError):
    pass


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6 if path.is_dir() else 0.0


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
        barrier()  # every rank has written everything for this tag
        if rank == 0:
            files = sorted(p.name for p in tag_dir.iterdir() if p.is_file() and p.name != CHECKSUMS)
            sums = {name: sha256_file(tag_dir / name) for name in files}
            atomic_write_text(tag_dir / CHECKSUMS, json.dumps({"world_size": dist.get_world_size(), "files": sums}))
            atomic_write_text(self.directory / LATEST, tag)
            self._prune(keep=tag)
        barrier()

    def keep_as_best(self, tag: str, rank: int, best: dict) -> None:
        """Rank 0: make ``best/`` a copy of checkpoint ``tag`` (hard links where the file system
        allows: no second copy of the weights) with ``best.json`` naming its metric, value and
        step; the previous ``best`` is replaced only once the new one is complete."""
        if rank != 0:
            return
        source, target = self.directory / tag, self.directory / BEST
        staging, old = self.directory / f".{BEST}.new", self.directory / f".{BEST}.old"
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.copytree(source, staging, copy_function=_link_or_copy)
        atomic_write_text(staging / "best.json", json.dumps(dict(best, tag=tag)))
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)

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

    def problem(self, tag: str) -> str | None:
        """Why checkpoint ``tag`` cannot be resumed (None: complete and intact: every file it lists
        matches its checksum, and every process that wrote it wrote its state)."""
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
        return None

    def choose(self, advice: str = "") -> tuple[str, list[str]]:
        """The newest usable checkpoint (the latest first) and the reasons others were skipped.
        ``advice``: what the error where none is usable ends with (a training resume's: RESTART_ADVICE)."""
        latest = self.latest_tag()
        skipped = []
        if latest is not None and latest not in self.tags():
            skipped.append(f"latest names {latest!r}, which does not exist" if latest else "latest is empty")
        order = ([latest] if latest in self.tags() else []) + [t for t in self.tags() if t != latest]
        for tag in order:
            reason = self.problem(tag)
            if reason is None:
                return tag, skipped
            skipped.append(f"{tag}: {reason}")
        raise ResumeError(f"no usable checkpoint in {self.directory}: " + ("; ".join(skipped) or "none written")
                          + advice)

    def load(self, engine, rank: int, weights_only: bool = False,
             check: Callable[[Path, dict], str | None] | None = None) -> dict:
        """Load the newest verified checkpoint into ``engine`` (rank 0 decides, every rank loads
        the same one); returns this rank's saved state (rank 0's for a rank the checkpoint's run did
        not have) and sets ``self.loaded_tag``. ``check(tag folder, rank 0's state)``: rank 0's reason
        not to load it (None: load), raised on every rank before anything is loaded.
        ``weights_only``: the trainable weights without optimizer state, for any number of
        processes (evaluation), with rank 0's state (config hash, frozen reference)."""
        choice: list = [None]
        if rank == 0:
            try:
                tag, skipped = self.choose("" if weights_only else RESTART_ADVICE)  # evaluation: --overwrite excluded
                for why in skipped:
                    print(f"warning: checkpoint skipped: {why}", file=sys.stderr, flush=True)
                problem = check(self.directory / tag, self._state(tag, 0)) if check else None
                choice = [(tag, f"checkpoint {tag}: {problem}" if problem else None)]
            except ResumeError as e:
                choice = [(None, str(e))]
        dist.broadcast_object_list(choice, src=0)
        tag, error = choice[0]
        if error:
            raise ResumeError(error)
        state = self._state(tag, 0 if weights_only else rank)
        engine.checkpoint_engine.load = _weights_only_load
        engine.load_checkpoint(str(self.directory), tag=tag, load_module_strict=False,
                               load_optimizer_states=not weights_only, load_lr_scheduler_states=False)
        self.loaded_tag = tag
        return state

    def _state(self, tag: str, rank: int) -> dict:
        """The state ``rank`` saved with checkpoint ``tag``; rank 0's where the run that wrote it had
        fewer processes (a resume onto more: step and epoch are every rank's, and the data position
        is laid out afresh for the new processes)."""
        path = self.directory / tag / f"state_rank{rank}.json"
        return json.loads((path if path.is_file() else self.directory / tag / "state_rank0.json").read_text())

