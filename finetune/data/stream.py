"""Batches of a map-style fine-tuning dataset as a ``ResumableStream`` (so the shared loader and
training loop drive it exactly as pre-training's shards).

Epoch e visits a permutation of the frames drawn from (seed, e), tiled to fill whole batches on
every rank; rank r takes every world-th frame. Sample i of epoch e is augmented with its own
generator seeded by (seed, e, i), so batch k is the same whichever worker builds it and resuming
at batch k needs nothing but k. A frame that fails to load at run time is counted and replaced
by the next frame of the permutation.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from pretrain.engine import DataError, PlanError, ResumableStream


def batches_per_epoch(num_samples: int, world: int, batch_size: int, multiple: int = 1) -> int:
    """Micro-batches per epoch and rank: as many whole batches as the frames fill on every rank,
    rounded down to a multiple of ``multiple`` (the gradient accumulation, so that every optimizer
    step gets all its micro-batches) and at least ``multiple``: a split smaller than one effective
    batch is tiled (its frames repeat within the step) rather than leaving a step short."""
    if num_samples < 1:
        raise PlanError("the dataset has no usable frames (see the data report)")
    return max(num_samples // (world * batch_size) // multiple, 1) * multiple


class MapBatchStream(ResumableStream):
    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 accumulation: int = 1):
        super().__init__(batches_per_epoch(len(dataset), world_size, batch_size, accumulation))
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's frame indices for the epoch, batches_per_epoch x batch_size of them."""
        n = len(self.dataset)
        need = self.batches_per_epoch * self.batch_size * self.world_size
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        order = np.tile(order, -(-need // n))[:need]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict]:
        worker, _, mine = self.my_batches()
        epoch, bs = self.epoch, self.batch_size
        order = self.epoch_order(epoch)
        for b in mine:
            samples, bad, error, failed = [], 0, None, None
            for j in range(bs):
                for attempt in range(len(order)):
                    i = int(order[(b * bs + j + attempt) % len(order)])
                    try:
                        samples.append(self.dataset.train_sample(i, np.random.default_rng([self.seed, epoch, i])))
                        break
                    except Exception as e:  # changed on disk since it was checked: counted, replaced
                        bad, error, failed = bad + 1, e, i
                else:  # the frame's name only now: names() lists every frame
                    raise DataError(f"no frame of the dataset could be loaded any more (the last, "
                                    f"{self.dataset.names()[failed]}: {error}): were its "
                                    "files moved or deleted while the run trained? With them back, the same command "
                                    "resumes from the last checkpoint")
            batch = self.dataset.collate(samples)
            batch.update(batch=b, worker=worker, position=0, bad_samples=bad, bad_shard_urls=[],
                         keys=[s["name"] for s in samples])
            yield batch
