"""The frames of an evaluation, one at a time, read by spawned loader workers. A module of its own,
light to import: each worker imports the module of what it unpickles (this one and the dataset's),
and the runner's would bring the models, timm and torchvision into every worker (4.7 s each)."""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Callable, Iterator

import torch

from pretrain.engine.signals import ignore_preemption_signals, stop_polling, stop_signals_held


class _EvalFrames(torch.utils.data.Dataset):
    """``dataset``'s frames at ``indices``. Given ``path``, a file that holds both, a spawned worker
    is handed that path and loads the file as it starts: each worker is handed its dataset pickled
    through a pipe, and one larger than the pipe's buffer made the spawn wait for each worker to import
    torch and read it, one after the other (a KAIST-sized test split, 1 MB pickled: 1.6 s a worker,
    at every evaluation; BENCHMARKS), where the workers now start side by side. The file is this
    process's own, written just before into a folder only its user can read, as the pipe was."""

    def __init__(self, dataset, indices: list[int], path: str | None = None):
        self.dataset, self.indices, self.path = dataset, indices, path

    def __getstate__(self) -> dict:
        return self.__dict__ if self.path is None else {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        if "dataset" not in state:
            with open(state["path"], "rb") as f:
                state = dict(zip(("dataset", "indices"), pickle.load(f)), path=state["path"])
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset.eval_sample(self.indices[i])


def _as_is(sample):
    return sample


def eval_loader(dataset, indices: list[int], workers: int) -> Iterator[dict]:
    """This rank's frames, one at a time, read by spawned workers that ignore the stop signals (the
    training process decides), from their start. The workers start at the first frame asked for;
    when the frames end or are left, the workers end, then the file they load theirs from goes."""
    if not workers:
        yield from torch.utils.data.DataLoader(_EvalFrames(dataset, indices), batch_size=None, collate_fn=_as_is)
        return
    with tempfile.TemporaryDirectory(prefix="irpt-eval-frames-") as folder:
        path = os.path.join(folder, "frames.pickle")
        with open(path, "wb") as f:
            pickle.dump((dataset, indices), f, protocol=pickle.HIGHEST_PROTOCOL)
        loader = torch.utils.data.DataLoader(_EvalFrames(dataset, indices, path), batch_size=None,
                                             num_workers=workers, collate_fn=_as_is, multiprocessing_context="spawn",
                                             worker_init_fn=ignore_preemption_signals)
        with stop_signals_held():
            frames = iter(loader)  # spawns the workers
        try:
            yield from frames
        finally:  # the workers end (a worker still starting reads the file first), then the file goes
            del frames


def rank_frames(dataset, rank: int, world: int, workers: int,
                stop_requested: Callable[[], bool] | None = None) -> tuple[list[int], Iterator[dict]]:
    """This rank's share of an evaluation (every ``world``-th frame from ``rank``) and its frames,
    ``stop_requested`` asked before each frame that every rank has (:func:`stop_polling`)."""
    indices = list(range(rank, len(dataset), world))
    return indices, stop_polling(eval_loader(dataset, indices, workers), len(dataset) // world, stop_requested)
