"""Seconds from a loader's start to its first batch, by how the dataset reaches the spawned workers:
in shared memory (the toolkit's way) or pickled through each worker's spawn pipe (PyTorch's).

    python bench/bench_worker_start.py [--frames 20000] [--workers 2 4 8] [--repeats 3]

The dataset stands for a detection split: per frame a name and a few boxes (KAIST's training list,
about 25,000 frames, pickles to a few MB). Both loaders of a run are timed: the training loader
(a fine-tuning stream behind persistent workers) and an evaluation's. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.data.eval_frames import eval_loader  # noqa: E402
from finetune.data.stream import MapBatchStream  # noqa: E402
from pretrain.engine import EpochLoader  # noqa: E402
from pretrain.engine.worker_start import SharedPickle  # noqa: E402


class SplitLike:
    """``frames`` frame records as a detection dataset keeps them; samples are a number each (the
    time measured is the workers' start, not reading frames)."""

    def __init__(self, frames: int):
        rng = np.random.default_rng(0)
        self.frames = [(f"set{i % 12:02d}/V{i % 9:03d}/lwir/I{i:05d}", rng.uniform(0, 640, (3, 4)).astype(np.float32))
                       for i in range(frames)]

    def __len__(self) -> int:
        return len(self.frames)

    def train_sample(self, i, rng):
        return {"name": self.frames[i][0], "value": torch.tensor([i])}

    def collate(self, samples):
        return {"value": torch.cat([s["value"] for s in samples])}

    def eval_sample(self, i):
        return i


def first_batch_seconds(dataset: SplitLike, workers: int, which: str) -> float:
    start = time.perf_counter()
    if which == "training":
        loader = EpochLoader(MapBatchStream(dataset, batch_size=2, seed=0), workers)
        batches = loader.epoch(0)
        next(batches)
    else:
        frames = eval_loader(dataset, list(range(workers * 4)), workers)
        next(frames)
    seconds = time.perf_counter() - start
    if which == "training":
        del batches, loader
    else:
        list(frames)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dataset = SplitLike(args.frames)
    shared = SharedPickle.share_state
    rows = []
    for workers in args.workers:
        for which in ("training", "evaluation"):
            for how in ("shared memory", "spawn pipe"):
                # the spawn pipe: nothing shared, so the object pickles whole into each worker's pipe
                SharedPickle.share_state = shared if how == "shared memory" else (lambda self: None)
                seconds = [first_batch_seconds(dataset, workers, which) for _ in range(args.repeats)]
                rows.append(dict(loader=which, workers=workers, handed_over=how,
                                 first_batch_s=round(statistics.median(seconds), 2)))
                print(json.dumps(rows[-1]), flush=True)
    SharedPickle.share_state = shared
    print(json.dumps(dict(frames=args.frames, pickled_mb=round(len(pickle.dumps(dataset)) / 1e6, 2),
                          cpus=os.cpu_count(), machine=platform.processor() or platform.machine(),
                          torch=torch.__version__, repeats=args.repeats, rows=rows), indent=1))


if __name__ == "__main__":
    main()
