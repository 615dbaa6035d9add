"""Starting a loader's spawned workers: side by side, with the stop signals held.

A spawned worker receives what it runs pickled through a pipe. One larger than the pipe's buffer
(64 KiB on Linux: any dataset that lists a few thousand frames) makes the parent wait, at each
worker's start, until that worker has imported torch and read it all, so the workers start one
after the other (8 workers, a 2.7 MB dataset: 12 s before the first batch, against 6 s for a small
one, on 2 cores; BENCHMARKS). Pickled once into a block of shared memory, whose file descriptor each
spawned process inherits as it is created, the dataset travels as a few bytes and the workers start
side by side. The block is anonymous (unlinked as it is made, as multiprocessing's shared arrays
are): it goes with the last process that maps it, however they end, and no file is left to load.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import pickle
import sys

import torch

from pretrain.engine.signals import stop_signals_held


class SharedPickle:
    """Mixin for a loader's dataset. Between :meth:`share_state` and :meth:`unshare_state` it pickles
    (to a process being spawned: a shared block can go nowhere else) as a block of shared memory
    holding its pickled state, with the attributes named in ``_pickled_inline`` (shared memory of
    their own) beside it; the worker loads the state from the block as it unpickles it."""

    _pickled_inline: tuple[str, ...] = ()
    _shared_state = None

    def share_state(self) -> None:
        state = {k: v for k, v in self.__dict__.items() if k not in self._pickled_inline and k != "_shared_state"}
        data = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        block = mp.get_context("spawn").RawArray(ctypes.c_ubyte, len(data))
        ctypes.memmove(block, data, len(data))
        self._shared_state = block

    def unshare_state(self) -> None:
        self._shared_state = None

    def __getstate__(self) -> dict:
        if self._shared_state is None:
            return self.__dict__
        return {"_shared_state": self._shared_state, **{k: self.__dict__[k] for k in self._pickled_inline}}

    def __setstate__(self, state: dict) -> None:
        block = state.pop("_shared_state", None)
        if block is not None:
            self.__dict__.update(pickle.loads(ctypes.string_at(block, len(block))))
        self.__dict__.update(state)


def start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)``, which spawns its workers: each inherits the dataset's shared block (a
    :class:`SharedPickle`) as it is created, and is born with the stop signals blocked
    (:func:`stop_signals_held`). Where no block can be made (no room in /dev/shm, nor in the temporary
    folder multiprocessing falls back to), the dataset goes through the pipes as before, and a line
    says why the start is slower."""
    try:
        loader.dataset.share_state()
    except OSError as e:
        print(f"note: loader workers get their dataset through their pipes, one after the other (no shared "
              f"memory for it: {e})", file=sys.stderr, flush=True)
    try:
        with stop_signals_held():
            return iter(loader)
    finally:  # every worker holds the block now
        loader.dataset.unshare_state()
