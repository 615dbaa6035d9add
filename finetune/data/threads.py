"""Checking every frame of a split on the process's share of the CPU cores."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def frame_threads() -> int:
    """This process's share of the cores it may use (its affinity and CPU quota) among the processes
    of its node, whatever torch's intra-op thread count (torchrun sets that to 1)."""
    from data_tools.cpus import usable_cpus
    from pretrain.engine.distributed import threads_per_process

    return threads_per_process(os.environ, usable_cpus())


def map_in_threads(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` in order, on :func:`frame_threads` threads. Reading and decoding
    frames is file and codec work that OpenCV does without holding the GIL, so threads scale it
    without the start-up and pickling of worker processes; ``fn`` should return something small
    (not the frames), as every result is kept until the list is complete."""
    threads = min(frame_threads(), len(items))
    if threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))
