"""The pre-training input stream over WebDataset shards, exactly resumable.

Order is a pure function of (seed, epoch, rank, worker):
- each shard set's shards are permuted per epoch (and per pass when a slot cycles its shards);
- slots (rank x loader worker) take disjoint contiguous runs of each pass's samples in that shard
  order, equal to one sample, reading only their own part of a shard shared with a neighbour, so
  no rank starves and the corpus is read about once per pass, however many slots there are (the
  build writes samples in a shuffled order, so a run holds every source: ``data_tools.build.write_order``);
- several shard sets are interleaved by weighted sampling;
- a seeded shuffle buffer mixes the samples of each pass; each sample's crop/flip draws from its own generator,
  seeded by its position in the stream, so skipping samples needs no decoding.
Each loader worker yields whole batches; a PyTorch DataLoader takes batches from its workers in
round-robin order, so batch i of an epoch comes from worker i % W, every rank yields exactly
``batches_per_epoch`` batches, and resuming at batch k replays nothing but tar reading.
Corrupt samples and unreadable shards are counted and skipped; the counts travel with each batch.
"""
from __future__ import annotations

import functools
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_tools.manifest import read_manifest
from data_tools.shards import (SampleDecodeError, decode_for_training, iter_shard, read_indexed_sample,
                               shard_index)
from data_tools.transforms import (IntensityConfig, RoICropConfig, normalize_ir, object_sensitive_crop,
                                   random_hflip, to_unit_intensity)
from pretrain.engine.streams import DataError, PlanError, ResumableStream


MAX_CONSECUTIVE_BAD_SAMPLES = 100  # then the data, not a sample, is broken: stop with the reason


@dataclass(frozen=True)
class ShardSet:
    name: str
    urls: tuple[str, ...]
    samples: int  # from the manifest
    weight: float = 1.0
    # Samples of each shard (manifest): what each loader slot's share is cut from; a shard cut at a
    # tar block boundary reads as a shorter, valid tar, so only this count tells it is truncated.
    shard_samples: tuple[int, ...] = ()
    # The build's ``shards.order``: "corpus" (source by source; builds before the setting existed too)
    # gives each loader stream runs of one source's consecutive frames (see ``corpus_order_note``).
    order: str = "shuffled"

    def __post_init__(self):
        if len(self.shard_samples) != len(self.urls):
            raise ValueError(f"shard set '{self.name}': {len(self.shard_samples)} counts for {len(self.urls)} shards")


def load_shard_set(path: str, weight: float = 1.0, name: str | None = None) -> ShardSet:
    """A folder built by ``data_tools build`` (its manifest lists the shards and counts)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    urls = tuple(str(folder / s["shard"]) for s in manifest["shards"])
    if not urls:
        raise ValueError(f"{folder}: the manifest lists no shards")
    return ShardSet(name or folder.name, urls, int(manifest["totals"]["written"]), float(weight),
                    tuple(int(s["samples"]) for s in manifest["shards"]),
                    manifest["config"]["shards"].get("order", "corpus"))


def corpus_order_note(sets: list[ShardSet]) -> str | None:
    """What training says of shard sets written source by source: each loader stream reads a run of
    consecutive samples, there a few sequences of one source, which its shuffle buffer cannot mix with
    the rest of the corpus as PAD's random sampler does."""
    ordered = [s.name for s in sets if s.order == "corpus" and len(s.urls) > 1]
    if not ordered:
        return None
    return (f"note: shard set(s) {', '.join(ordered)} hold their frames source by source (shards.order=corpus, or "
            "built before the setting): each loader stream reads runs of one source's consecutive frames, so a "
            "batch holds few sources and sequences; rebuild with `python -m data_tools build ... --overwrite` "
            "(shards.order=shuffled, the default) to mix them in every shard")


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 64  # per process
    batches_per_epoch: int = 1  # per process, identical on every rank
    shuffle_buffer: int = 1000
    hflip: float = 0.5
    mean: float = 0.3801
    std: float = 0.1871
    roi: RoICropConfig = field(default_factory=RoICropConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)


def epoch_samples(sets: list[ShardSet], samples_per_epoch: int | None) -> int:
    """Samples an epoch draws: ``data.samples_per_epoch``, or every sample of every set once."""
    return samples_per_epoch or sum(s.samples for s in sets)


def batches_per_epoch(sets: list[ShardSet], samples_per_epoch: int | None, world_size: int, batch_size: int) -> int:
    total = epoch_samples(sets, samples_per_epoch)
    n = total // (world_size * batch_size)
    if n < 1:
        raise PlanError(f"{total} samples per epoch cannot fill one batch of {batch_size} on each of "
                         f"{world_size} processes")
    return n


def micro_batches_per_epoch(sets: list[ShardSet], samples_per_epoch: int | None, world_size: int, batch_size: int,
                           accum: int) -> int:
    """Micro-batches per epoch and process: whole optimiser steps, as MAE's loop takes them (a step every
    ``accum`` micro-batches of a drop_last loader): an MSIP epoch of 4,096-sample steps is 43 steps on any
    number of GPUs. Loader workers may then yield one micro-batch more than another: such a worker's
    stream goes on into its next pass for those samples. 0: not one step."""
    return batches_per_epoch(sets, samples_per_epoch, world_size, batch_size) // accum * accum


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


_AT = "__at__"  # a sample passed while a resume skipped, not read: (shard url, index in the shard)


_shard_index = functools.lru_cache(maxsize=4)(shard_index)  # the buffer's left samples come from a few shards


def _read_if_left(sample: dict) -> dict:
    """``sample``, read now if the skip of a resume passed it without reading it (one of the samples
    the shuffle buffer held when the skip ended), at its offsets in its shard: each shard's headers
    are walked once for all its left samples, not once per sample."""
    if _AT not in sample:
        return sample
    url, index = sample[_AT]
    try:
        samples = _shard_index(url)
        if index >= len(samples):
            raise SampleDecodeError(f"sample {sample['__key__']}: its shard {url} ended before it")
        return {"__key__": samples[index][0], **read_indexed_sample(url, samples[index][1])}
    except (OSError, tarfile.TarError, EOFError) as e:
        raise SampleDecodeError(f"sample {sample['__key__']}: its shard {url} cannot be read again: {e}") from e


class PretrainStream(ResumableStream):
    needs_positions = True
    _skipping = False  # True while a resume skips the samples consumed before it
    order_version = 2  # 1: whole shards per loader stream (before 2026-12-05); 2: contiguous runs of samples

    def __init__(self, sets: list[ShardSet], cfg: StreamConfig, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(cfg.batches_per_epoch)
        if not sets:
            raise ValueError("no shard sets given")
        self.sets, self.cfg, self.seed = sets, cfg, seed
        self.rank, self.world_size = rank, world_size

    # --- the raw sample stream of one slot ---
    def _slot_pass(self, set_index: int, slot: int, slots: int, cycle: int, counters: dict) -> Iterator[dict]:
        """One pass of a slot over its share of a shard set: a contiguous run of the pass's samples in
        its shard order, 1/slots of them (to one sample), as a distributed sampler splits a dataset.
        A shard split between neighbouring slots is read by each for its part only: the samples before
        it are skipped over by their headers, the reading stops after it. (Slots used to take whole
        shards: with fewer shards than slots each read every shard, the corpus read once per slot.)"""
        shard_set = self.sets[set_index]
        counts, total = shard_set.shard_samples, sum(shard_set.shard_samples)
        order = np.random.default_rng([self.seed, self.epoch, set_index, cycle]).permutation(len(shard_set.urls))
        if not total:
            return
        lo, hi = slot * total // slots, (slot + 1) * total // slots
        if lo == hi:  # fewer samples than slots: one each, repeating
            lo, hi = slot % total, slot % total + 1
        start = 0  # the pass's index of the current shard's first sample
        for shard in order:
            first, last, start = lo - start, hi - start, start + counts[shard]
            if last <= 0:
                break
            if first >= counts[shard]:
                continue
            url, first, last = shard_set.urls[shard], max(first, 0), min(last, counts[shard])
            read = 0
            try:
                for i, (key, members) in enumerate(iter_shard(
                        url, wanted=lambda i, first=first: i >= first and not self._skipping)):
                    read = i + 1
                    if i >= first:  # while a resume skips, where the sample is, for the few it will use
                        yield {"__key__": key, **members} if members is not None else {"__key__": key, _AT: (url, i)}
                    if read == last:
                        break
            except (OSError, tarfile.TarError, EOFError):  # unreadable or truncated shard: named, skipped
                counters["bad_shard_urls"].append(url)
                continue
            if read < last:  # cut at a block boundary: a valid but shorter tar
                counters["bad_shard_urls"].append(url)

    def _slot_stream(self, set_index: int, slot: int, slots: int, counters: dict) -> Iterator[dict]:
        """Endless passes, each shuffled on its own (the buffer is flushed at the end of a pass),
        so a slot yields every sample of a pass before any sample repeats."""
        for cycle in range(10**9):
            rng = np.random.default_rng([self.seed, self.epoch, slot, set_index, cycle, 2 * 10**6])
            yielded = 0
            for sample in seeded_shuffle(self._slot_pass(set_index, slot, slots, cycle, counters),
                                         self.cfg.shuffle_buffer, rng):
                yielded += 1
                yield sample
            if yielded == 0:  # never spin on a set that has nothing readable
                raise DataError(f"shard set '{self.sets[set_index].name}': a full pass over its shards gave no "
                                f"readable sample for loader slot {slot} of {slots} (were they moved, deleted or "
                                "changed while the run trained? `python -m data_tools verify` checks them)")

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

    def _crop(self, sample: dict, rng: np.random.Generator) -> np.ndarray:
        """The flipped RoI crop of a sample, still in the frame's integer type: the frame is
        sliced and resized before anything is converted to float."""
        image, proposals = decode_for_training(sample)  # SampleDecodeError: the stored sample is bad
        try:
            crop = object_sensitive_crop(image, proposals, rng, self.cfg.roi).image
            return random_hflip(crop, rng, self.cfg.hflip)
        except Exception as e:  # a transform error is a bug or a bad setting, not a bad sample
            raise RuntimeError(f"the pre-training transform failed on sample {sample.get('__key__')} "
                               f"({image.shape[1]}x{image.shape[0]}, {len(proposals)} proposals): {e}") from e

    def _to_network(self, crops: list[np.ndarray]) -> torch.Tensor:
        """The batch as the loader ships it: 8-bit crops stay uint8, (B, 1, H, W): a quarter of
        the bytes of float32 between loader processes and to the GPU; ``network_input`` turns
        them into the network's float32 input where the batch is used. 16-bit crops are
        converted here, one by one, since their intensity rule can depend on each crop."""
        if all(c.dtype == np.uint8 for c in crops):
            return torch.from_numpy(np.stack(crops)[:, None])
        return torch.from_numpy(np.stack([normalize_ir(to_unit_intensity(c, self.cfg.intensity), self.cfg.mean, self.cfg.std)
                                          for c in crops])[:, None].astype(np.float32))

    def __iter__(self) -> Iterator[dict]:
        worker, workers, my_batches = self.my_batches()
        slots, slot = self.world_size * workers, self.rank * workers + worker
        bs = self.cfg.batch_size
        if self.positions is not None and len(self.positions) != workers:
            raise ValueError(f"the saved data position has {len(self.positions)} loader workers, this run "
                             f"{workers}: resume with data.num_workers={len(self.positions)}")
        counters = {"bad_samples": 0, "bad_shard_urls": []}
        stream = self._mixed_stream(slot, slots, counters)
        position = self.positions[worker] if self.positions else 0  # raw samples consumed so far
        self._skipping = True  # the samples skipped are not read, only walked past in their shards
        for _ in range(position):
            next(stream)
        self._skipping = False
        reported_samples, reported_shards = counters["bad_samples"], len(counters["bad_shard_urls"])
        consecutive_bad = 0
        for b in my_batches:
            crops, keys = [], []
            while len(crops) < bs:
                sample = next(stream)
                rng = np.random.default_rng([self.seed, self.epoch, slot, position])
                position += 1
                try:
                    crops.append(self._crop(_read_if_left(sample), rng))
                    keys.append(sample["__key__"])
                    consecutive_bad = 0
                except SampleDecodeError as e:  # a corrupt sample: counted and skipped, unless all are
                    counters["bad_samples"] += 1
                    consecutive_bad += 1
                    if consecutive_bad >= MAX_CONSECUTIVE_BAD_SAMPLES:
                        raise DataError(f"{consecutive_bad} consecutive samples failed to decode, the last: {e} "
                                        "(`python -m data_tools verify` checks the shards)") from e
            batch = self._to_network(crops)
            new_bad_shards = counters["bad_shard_urls"][reported_shards:]  # failed reads since the last batch
            yield {"images": batch, "keys": keys, "epoch": self.epoch, "batch": b, "worker": worker, "position": position,
                   "bad_samples": counters["bad_samples"] - reported_samples,
                   "bad_shards": len(new_bad_shards), "bad_shard_urls": new_bad_shards}
            reported_samples, reported_shards = counters["bad_samples"], len(counters["bad_shard_urls"])


def network_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """A loader batch as the network's float32 input: uint8 batches get the 8-bit intensity rule
    (/ 255) and PAD's normalisation here, on whatever device they are (the same float32
    arithmetic as ``normalize_ir(to_unit_intensity(crop))``, so the same numbers); float batches
    (16-bit frames, converted in the loader) pass unchanged."""
    if images.dtype == torch.uint8:
        return (images.float() / 255.0 - mean) / std
    return images
