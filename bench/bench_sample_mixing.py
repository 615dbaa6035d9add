"""How well pre-training batches mix the corpus, by the order shards are written in (``shards.order``):
sources and sequences per micro-batch and per optimiser step, against PAD's random sampler.

    python bench/bench_sample_mixing.py [--gpus 8] [--workers 4] [--micro 64] [--effective 4096]

The corpus has MSIP's shape (8 sources, 178,756 frames, PAD's counts) and shards of 1,000 samples;
the video sources come in sequences (LSOTB-TIR 41 kept frames each, LasHeR 53: their frame counts over
their 1,280 and 979 training sequences; SCUT FIR assumed 100), every other frame is an image of its own.
The samples are written in the order ``data_tools.build.write_order`` gives, each a tar entry of a
few bytes; the real ``PretrainStream`` reads them, slot by slot (rank x loader worker), with its
shuffle buffer (1,000); only its crop is replaced by a stub, since the frames do not matter here.
A step's samples are those of the accumulated micro-batches of every rank, as the loader deals them.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.build import write_order  # noqa: E402
from data_tools.shards import ShardFile  # noqa: E402
from pretrain.data import PretrainStream, StreamConfig, load_shard_set  # noqa: E402

# PAD's MSIP sources: (name, frames, frames per sequence; 1: independent images)
MSIP = [("dronevehicle", 17990, 1), ("scutfir", 21049, 100), ("llvip", 12025, 1), ("aerial", 5523, 1),
        ("ship", 8402, 1), ("security", 8999, 1), ("lsotbtir", 52925, 41), ("lasher", 51843, 53)]
SHARD_SAMPLES = 1000


def corpus_keys() -> list[str]:
    """Each frame's key, in corpus order (source by source): source, sequence, frame."""
    return [f"{name}_{i // per_seq if per_seq > 1 else f'i{i}'}_{i}" for name, n, per_seq in MSIP for i in range(n)]


def write_shards(folder: Path, order: str) -> None:
    keys = corpus_keys()
    written = [keys[i] for i in write_order(len(keys), {"order": order, "seed": 0})]
    shards = []
    for n, start in enumerate(range(0, len(written), SHARD_SAMPLES)):
        shard = ShardFile(str(folder / f"shard-{n:06d}.tar"))
        for key in written[start:start + SHARD_SAMPLES]:
            shard.write({"__key__": key, "npy": b"x"})
        shard.close()
        shards.append({"shard": f"shard-{n:06d}.tar", "samples": shard.count})
    (folder / "manifest.json").write_text(json.dumps({
        "status": "complete", "shards": shards, "totals": {"written": len(written)},
        "config": {"shards": {"order": order}}}))


class KeysOnly(PretrainStream):
    def _crop(self, sample, rng):  # the frames do not matter here: the samples' keys do
        return np.zeros((1, 1), np.uint8)


def step_keys(folder: Path, gpus: int, workers: int, micro: int, accum: int, shuffle_buffer: int) -> list[list[str]]:
    """Each optimiser step's samples in epoch 0. Rank r's loader worker w is slot r * workers + w;
    the loader takes micro-batch b of a rank from its worker b % workers, so each step takes
    accum / workers micro-batches of every slot, in their order."""
    shard_set = load_shard_set(str(folder))
    slots = gpus * workers
    per_slot = shard_set.samples // (micro * slots) // (accum // workers) * (accum // workers)
    cfg = StreamConfig(batch_size=micro, batches_per_epoch=per_slot, shuffle_buffer=shuffle_buffer)
    per_step = accum // workers
    steps = [[] for _ in range(per_slot // per_step)]
    for slot in range(slots):  # a stream of world size = slots, no loader workers, plays that slot
        for b, batch in enumerate(KeysOnly([shard_set], cfg, seed=0, rank=slot, world_size=slots)):
            steps[b // per_step].append(batch["keys"])
    return steps


def mixing(steps: list[list[list[str]]]) -> dict:
    def source(k):
        return k.split("_")[0]

    def sequence(k):
        return k.rsplit("_", 1)[0]

    micro = [b for step in steps for b in step]
    flat = [sum(step, []) for step in steps]
    largest = [max(np.unique([source(k) for k in s], return_counts=True)[1]) / len(s) for s in flat]
    return {
        "micro-batch: sources, median": float(np.median([len({source(k) for k in b}) for b in micro])),
        "micro-batch: sequences or images, median": float(np.median([len({sequence(k) for k in b}) for b in micro])),
        "step: sources, median": float(np.median([len({source(k) for k in s}) for s in flat])),
        "step: largest source share, median / max": [round(float(f(largest)), 3) for f in (np.median, np.max)],
        "step: sequences or images, median": float(np.median([len({sequence(k) for k in s}) for s in flat])),
    }


def random_sampler(micro: int, per_step_micro: int, steps: int) -> list[list[list[str]]]:
    """PAD's sampler: a uniform permutation of the whole corpus each epoch."""
    keys = np.array(corpus_keys())[np.random.default_rng(0).permutation(len(corpus_keys()))].tolist()
    return [[keys[(s * per_step_micro + m) * micro:(s * per_step_micro + m + 1) * micro] for m in range(per_step_micro)]
            for s in range(steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4, help="loader workers per GPU (pad_vitb.yaml: 4)")
    ap.add_argument("--micro", type=int, default=64, help="micro-batch per GPU (pad_vitb.yaml: 64)")
    ap.add_argument("--effective", type=int, default=4096, help="samples per optimiser step (PAD: 4096)")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    args = ap.parse_args()
    accum = args.effective // (args.micro * args.gpus)
    if accum % args.workers:
        sys.exit("accumulation steps must be a multiple of the loader workers here")
    out = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "gpus": args.gpus,
           "workers": args.workers, "micro": args.micro, "accumulation": accum}
    with tempfile.TemporaryDirectory() as tmp:
        for order in ("corpus", "shuffled"):
            folder = Path(tmp) / order
            folder.mkdir()
            t0 = time.perf_counter()
            write_shards(folder, order)
            steps = step_keys(folder, args.gpus, args.workers, args.micro, accum, args.shuffle_buffer)
            out[f"shards.order={order}"] = {**mixing(steps), "steps": len(steps),
                                            "seconds": round(time.perf_counter() - t0, 1)}
        per_step_micro = args.gpus * accum
        out["PAD's random sampler"] = mixing(random_sampler(args.micro, per_step_micro, len(steps)))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
