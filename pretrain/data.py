"""The pre-training input stream over WebDataset shards, exactly resumable.

Order is a pure function of (seed, epoch, rank, worker):
- each shard set's shards are permuted per epoch (and per pass when a slot cycles its shards);
- slots (rank x loader worker) take disjoint shards, or, when there are fewer shards than slots,
  every slot reads all shards and keeps every n-th sample, so no rank ever starves;
- several shard sets are interleaved by weighted sampling;
- a seeded shuffle buffer mixes samples; each sample's crop/flip draws from its own generator,
  seeded by its position in the stream, so skipping samples needs no decoding.
Each loader worker yields whole batches; a PyTorch DataLoader takes batches from its workers in
round-robin order, so batch i of an epoch comes from worker i % W, every rank yields exactly
``batches_per_epoch`` batches, and resuming at batch k replays nothing but tar reading.
Corrupt samples and unreadable shards are counted and skipped; the counts travel with each batch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_tools.shards import decode_sample
from data_tools.transforms import (IntensityConfig, RoICropConfig, normalize_ir, object_sensitive_crop,
                                   random_hflip, to_unit_intensity)


@dataclass(frozen=True)
class ShardSet:
    name: str
    urls: tuple[str, ...]
    samples: int  # from the manifest
    weight: float = 1.0


def load_shard_set(path: str, weight: float = 1.0, name: str | None = None) -> ShardSet:
    """A folder built by ``data_tools build`` (its manifest lists the shards and counts)."""
    folder = Path(path)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder}: no manifest.json (build shards with `python -m data_tools build`)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("status") != "complete":
        raise ValueError(f"{folder}: the shard build is not complete; rerun it to finish")
    urls = tuple(str(folder / s["shard"]) for s in manifest["shards"])
    if not urls:
        raise ValueError(f"{folder}: the manifest lists no shards")
    return ShardSet(name or folder.name, urls, int(manifest["totals"]["written"]), float(weight))


@dataclass(frozen=True)
class StreamConfig:
    input_size: tuple[int, int] = (224, 224)  # (height, width)
    batch_size: int = 64  # per process
    batches_per_epoch: int = 1  # per process, identical on every rank
    shuffle_buffer: int = 1000
    hflip: float = 0.5
    mean: float = 0.3801
    std: float = 0.1871
    roi: RoICropConfig = field(default_factory=RoICropConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)


def batches_per_epoch(sets: list[ShardSet], samples_per_epoch: int | None, world_size: int, batch_size: int) -> int:
    total = samples_per_epoch or sum(s.samples for s in sets)
    n = total // (world_size * batch_size)
    if n < 1:
        raise ValueError(f"{total} samples per epoch cannot fill one batch of {batch_size} on each of "
                         f"{world_size} processes")
    return n


def seeded_shuffle(samples: Iterator, bufsize: int, rng: np.random.Generator) -> Iterator:
    """Reservoir shuffle with a given generator (webdataset's shuffle seeds itself otherwise)."""
    buf = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = int(rng.integers(len(buf)))
        yield buf[i]
        buf[i] = sample
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


class PretrainStream(IterableDataset):
    def __init__(self, sets: list[ShardSet], cfg: StreamConfig, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        if not sets:
            raise ValueError("no shard sets given")
        self.sets, self.cfg, self.seed = sets, cfg, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch, self.positions = 0, 0, None

    def set_position(self, epoch: int, start_batch: int, positions: list[int] | None = None) -> None:
        """Where the next iterator starts (set before creating it: loader workers copy the dataset).

        ``positions[w]``: raw samples loader worker w had consumed, as reported with its last
        batch; exact even when corrupt samples made a worker draw extra ones. None at an epoch start.
        """
        if start_batch and positions is None:
            raise ValueError("resuming inside an epoch needs the per-worker stream positions")
        self.epoch, self.start_batch, self.positions = epoch, start_batch, positions

    # --- the raw sample stream of one slot ---
    def _slot_stream(self, set_index: int, slot: int, slots: int, counters: dict) -> Iterator[dict]:
        shard_set = self.sets[set_index]
        n = len(shard_set.urls)
        for cycle in range(10**9):
            order = np.random.default_rng([self.seed, self.epoch, set_index, cycle]).permutation(n)
            mine = order[slot::slots] if n >= slots else order
            index, yielded = 0, 0
            for shard in mine:
                url = shard_set.urls[shard]
                try:
                    with wds.gopen(url, "rb") as stream:
                        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                        for sample in wds.tariterators.group_by_keys(files):
                            index += 1
                            if n < slots and (index - 1) % slots != slot:
                                continue
                            yielded += 1
                            yield sample
                except Exception:  # unreadable or truncated shard: count it, go on with the next
                    counters["bad_shards"] += 1
            if yielded == 0:  # never spin on a set that has nothing readable
                raise RuntimeError(f"shard set '{shard_set.name}': a full pass over its shards gave no readable "
                                   f"sample for loader slot {slot} of {slots}")

    def _mixed_stream(self, slot: int, slots: int, counters: dict) -> Iterator[dict]:
        streams = [self._slot_stream(i, slot, slots, counters) for i in range(len(self.sets))]
        if len(streams) == 1:
            yield from streams[0]
            return
        weights = np.array([s.weight for s in self.sets], np.float64)
        weights /= weights.sum()
        rng = np.random.default_rng([self.seed, self.epoch, slot, 10**6])
        while True:
            yield next(streams[int(rng.choice(len(streams), p=weights))])

    def _transform(self, sample: dict, rng: np.random.Generator) -> np.ndarray:
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        image, proposals, _ = decode_sample(members)
        crop = object_sensitive_crop(image, proposals, rng, self.cfg.roi).image
        crop = random_hflip(crop, rng, self.cfg.hflip)
        return normalize_ir(to_unit_intensity(crop, self.cfg.intensity), self.cfg.mean, self.cfg.std)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        bs = self.cfg.batch_size
        if self.positions is not None and len(self.positions) != workers:
            raise ValueError(f"the saved data position has {len(self.positions)} loader workers, this run "
                             f"{workers}: resume with data.num_workers={len(self.positions)}")
        my_batches = [b for b in range(self.cfg.batches_per_epoch) if b % workers == worker and b >= self.start_batch]
        counters = {"bad_shards": 0, "bad_samples": 0}
        stream = seeded_shuffle(self._mixed_stream(slot, slots, counters), self.cfg.shuffle_buffer,
                                np.random.default_rng([self.seed, self.epoch, slot, 2 * 10**6]))
        position = self.positions[worker] if self.positions else 0  # raw samples consumed so far
        for _ in range(position):
            next(stream)
        reported = dict(counters)
        for b in my_batches:
            images = []
            while len(images) < bs:
                sample = next(stream)
                rng = np.random.default_rng([self.seed, self.epoch, slot, position])
                position += 1
                try:
                    images.append(self._transform(sample, rng))
                except Exception:  # a corrupt sample: counted, never fatal
                    counters["bad_samples"] += 1
            batch = torch.from_numpy(np.stack(images)[:, None].astype(np.float32))
            yield {"images": batch, "epoch": self.epoch, "batch": b, "worker": worker, "position": position,
                   "bad_samples": counters["bad_samples"] - reported["bad_samples"],
                   "bad_shards": counters["bad_shards"] - reported["bad_shards"]}
            reported = {k: counters[k] for k in ("bad_samples", "bad_shards")}


def epoch_loader(stream: PretrainStream, epoch: int, start_batch: int, positions: list[int] | None,
                 num_workers: int):
    """A fresh DataLoader iterator for one epoch, starting at ``start_batch``. Workers are
    spawned (not forked) so they never inherit locked thread pools from the training process."""
    stream.set_position(epoch, start_batch, positions)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                         multiprocessing_context="spawn" if num_workers else None)
    return iter(loader)
