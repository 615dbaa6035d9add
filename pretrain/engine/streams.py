"""What the training loop reads batches from: a stream of whole batches whose epoch and start
are set from outside (exact resume), and persistent loader workers that ignore preemption signals.

A stream yields dicts with the keys ``batch`` (index in the epoch), ``worker`` and ``position``
(the data position to resume from), ``keys`` (sample names), ``bad_samples`` (a count) and
``bad_shard_urls`` (failed shard reads) since the previous batch, and whatever the task's
``forward`` reads.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sys

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.engine.distributed import SHM_DIR
from pretrain.engine.signals import ignore_preemption_signals
from pretrain.engine.worker_start import SharedPickle, start_workers

MAX_WORKERS = 64  # loader workers per training process
# Fault injection: loader worker 0 dies (as by the OOM killer) as it starts epoch E ("E"), on one rank only ("E@R").
LOADER_KILL_FAULT_ENV = "IRPT_FAULT_SIGKILL_LOADER_WORKER_AT_EPOCH"


class DataError(ValueError):
    """The task's data cannot be used as configured (an annotation file that cannot be read); the
    message names the file and why (said without a traceback: it is the user's data, not a bug)."""


class PlanError(ValueError):
    """The data cannot fill the batches and steps the config asks for; the message says what to
    change (said without a traceback: it is the user's setting, not a bug)."""


def loader_worker_death(error: BaseException) -> str | None:
    """PyTorch's words when ``error`` says that a loader worker process died (killed by a signal,
    the out-of-memory killer's SIGKILL among them, or exited), else None."""
    text = str(error).strip()
    return text if isinstance(error, RuntimeError) and text.startswith("DataLoader worker (pid") else None


class ResumableStream(SharedPickle, IterableDataset):
    """An iterable of whole batches whose epoch and start are set from outside, also for
    persistent loader workers (they hold a copy of this object; the position lives in shared
    memory). Batch b of an epoch belongs to logical loader worker b % W."""

    _pickled_inline = ("_where",)
    needs_positions = False  # True when resuming inside an epoch needs per-worker stream positions
    order_version = 1  # raised when a new version deals the samples to the loader streams otherwise

    def __init__(self, batches_per_epoch: int):
        super().__init__()
        self.batches_per_epoch = batches_per_epoch
        # [epoch, start_batch, number of positions, positions...]
        self._where = mp.get_context("spawn").RawArray("q", 3 + MAX_WORKERS)

    @property
    def epoch(self) -> int:
        return int(self._where[0])

    @property
    def start_batch(self) -> int:
        return int(self._where[1])

    @property
    def positions(self) -> list[int] | None:
        n = int(self._where[2])
        return [int(v) for v in self._where[3 : 3 + n]] if n else None

    def set_position(self, epoch: int, start_batch: int, positions: list[int] | None = None) -> None:
        """Where the next iteration starts.

        ``positions[w]``: raw samples loader worker w had consumed, as reported with its last
        batch; exact even when corrupt samples made a worker draw extra ones. None at an epoch start.
        """
        if start_batch and positions is None and self.needs_positions:
            raise ValueError("resuming inside an epoch needs the per-worker stream positions")
        if positions is not None and len(positions) > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} loader workers")
        self._where[0], self._where[1] = epoch, start_batch
        self._where[2] = len(positions) if positions else 0
        for i, p in enumerate(positions or []):
            self._where[3 + i] = p

    def my_batches(self) -> tuple[int, int, list[int]]:
        """(logical worker, workers, the batch indices it yields from the start batch on).

        The DataLoader polls its workers round-robin from worker 0, so loader worker i plays
        logical worker (i + start) % W: the owner of the first remaining batch goes first and
        batches arrive in order after a resume."""
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None and loader_worker == 0 and os.environ.get(LOADER_KILL_FAULT_ENV) in (
                str(self.epoch), f"{self.epoch}@{os.environ.get('RANK', '0')}"):
            os.kill(os.getpid(), signal.SIGKILL)
        worker = (loader_worker + self.start_batch) % workers
        mine = [b for b in range(self.batches_per_epoch) if b % workers == worker and b >= self.start_batch]
        return worker, workers, mine


class EpochLoader:
    """Batches of a ResumableStream, epoch after epoch, from persistent loader workers.

    Workers are spawned once (not forked, so they never inherit locked thread pools from the
    training process) and told where each epoch starts through the stream's shared position.
    They never take SIGTERM / SIGUSR1 / SIGINT: born with them blocked (``stop_signals_held``) and
    ignoring them once PyTorch's worker handlers are installed: a scheduler signals the whole process
    group, and the training process must be the one to react (save, then stop), not lose its workers.
    """

    def __init__(self, stream: ResumableStream, num_workers: int, prefetch_factor: int = 2,
                 pin_memory: bool | None = None):
        """``prefetch_factor``: batches each worker prepares ahead (PyTorch's default 2).
        ``pin_memory``: page-locked batches for faster, asynchronous host-to-GPU copies (None:
        on when CUDA is available; it does nothing without a GPU)."""
        if num_workers and prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {prefetch_factor}")
        self.stream = stream
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
            multiprocessing_context="spawn" if num_workers else None,
            prefetch_factor=prefetch_factor if num_workers else None,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            worker_init_fn=ignore_preemption_signals if num_workers else None)
        self.started = False
        self.shared_memory_checked = False

    def epoch(self, epoch: int, start_batch: int = 0, positions: list[int] | None = None):
        self.stream.set_position(epoch, start_batch, positions)
        if self.started or self.loader.num_workers == 0:
            batches = iter(self.loader)
        else:
            self.started = True
            batches = start_workers(self.loader)
        return self._whole(batches, epoch, self.stream.batches_per_epoch - start_batch)

    def _whole(self, batches, epoch: int, expected: int):
        """``batches``, and an error where they end before the epoch's last one. A worker whose batch
        cannot be handed over (no room in /dev/shm: a container's default is 64 MiB) prints a traceback
        and the batch is lost; the epoch then ended short, a bare StopIteration in the training loop."""
        delivered = 0
        for batch in batches:
            if not self.shared_memory_checked:  # once, on the first batch: its size is known then
                self.shared_memory_checked = True
                self._warn_if_shared_memory_is_short(batch)
            delivered += 1
            yield batch
        if delivered < expected:
            advice = self._shared_memory_advice(_shared_memory_size())
            raise DataError(f"the data loader ended epoch {epoch} after {delivered} of {expected} batches: a loader "
                            f"worker could not hand over its batches (its message is above). If it says `unable to "
                            f"allocate shared memory`: {advice}. The same command resumes from the last checkpoint")

    def _shared_memory_need(self, batch) -> int:
        """Bytes of /dev/shm the batches in flight between this node's workers and processes take."""
        size = sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return size * (self.loader.num_workers * (self.loader.prefetch_factor or 0) + 1) * processes

    def _shared_memory_advice(self, size: int | None) -> str:
        """What to change where the workers' batches find no room in /dev/shm (of ``size`` bytes)."""
        held = f", which holds {size / 2**20:,.0f} MiB here" if size is not None else ""
        return (f"the workers pass batches through {SHM_DIR}{held}: give it more (a container: docker run "
                f"--shm-size=8g), or lower data.num_workers ({self.loader.num_workers}), data.prefetch_factor "
                f"({self.loader.prefetch_factor}) or the batch size")

    def _warn_if_shared_memory_is_short(self, batch) -> None:
        if not self.loader.num_workers or os.environ.get("LOCAL_RANK", "0") != "0":
            return
        need, size = self._shared_memory_need(batch), _shared_memory_size()
        if size is not None and need > size:
            print(f"warning: the batches in flight may take {need / 2**20:,.0f} MiB of shared memory: "
                  f"{self._shared_memory_advice(size)}", file=sys.stderr, flush=True)


def _shared_memory_size() -> int | None:
    try:
        return shutil.disk_usage(SHM_DIR).total
    except OSError:
        return None
