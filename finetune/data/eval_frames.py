"""The frames of an evaluation, one at a time, read by spawned loader workers. A module of its own,
light to import: each worker imports the module of what it unpickles (this one and the dataset's),
and the runner's would bring the models, timm and torchvision into every worker (4.7 s each)."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from pretrain.engine.signals import ignore_preemption_signals, stop_polling
from pretrain.engine.worker_start import SharedPickle, start_workers


class _EvalFrames(SharedPickle, torch.utils.data.Dataset):
    """``dataset``'s frames at ``indices``, handed to spawned workers in shared memory
    (:mod:`pretrain.engine.worker_start`: through the spawn pipe, a KAIST-sized test split, 1 MB
    pickled, made each evaluation's workers start one after the other, 1.6 s a worker; BENCHMARKS)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset.eval_sample(self.indices[i])


def _as_is(sample):
    return sample


def eval_loader(dataset, indices: list[int], workers: int) -> Iterator[dict]:
    """This rank's frames, one at a time, read by spawned workers that ignore the stop signals (the
    training process decides), from their start. The workers start at the first frame asked for
    and end with the frames, or when they are left."""
    if not workers:
        yield from torch.utils.data.DataLoader(_EvalFrames(dataset, indices), batch_size=None, collate_fn=_as_is)
        return
    loader = torch.utils.data.DataLoader(_EvalFrames(dataset, indices), batch_size=None, num_workers=workers,
                                         collate_fn=_as_is, multiprocessing_context="spawn",
                                         worker_init_fn=ignore_preemption_signals)
    yield from start_workers(loader)


def rank_frames(dataset, rank: int, world: int, workers: int,
                stop_requested: Callable[[], bool] | None = None) -> tuple[list[int], Iterator[dict]]:
    """This rank's share of an evaluation (every ``world``-th frame from ``rank``) and its frames,
    ``stop_requested`` asked before each frame that every rank has (:func:`stop_polling`)."""
    indices = list(range(rank, len(dataset), world))
    return indices, stop_polling(eval_loader(dataset, indices, workers), len(dataset) // world, stop_requested)
