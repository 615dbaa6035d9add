"""Pre-training loader throughput by frame encoding (png | raw): per-sample cost of each stage on
one core, and samples/s end to end through the training stream (PretrainStream + EpochLoader)
with 0 (in-process), 1 .. N loader workers. Prints JSON, with the cores a GPU needs at 2,000 and
6,000 samples/s.

    python bench/bench_loader.py [--workers 2] [--batches 40] [--repeats 3]

Data: the real MSRS (20) and RoadScene (221) infrared frames in ../shared/data, built once with
PNG frames and reencoded to raw (same proposals, same keys). Full pre-training transform: RoI
crop from the full-resolution frame, resize to 224, flip, intensity + PAD normalisation.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.build import build_shards  # noqa: E402
from data_tools.cli import DEFAULT_BUILD_CONFIG  # noqa: E402
from data_tools.config import load_config  # noqa: E402
from data_tools.reencode import reencode_shards  # noqa: E402
from data_tools.shards import PROPOSALS_EXT, decode_image, iter_shard, npy_array  # noqa: E402
from data_tools.sources import Source  # noqa: E402
from data_tools.transforms import (RoICropConfig, normalize_ir, object_sensitive_crop, random_hflip,  # noqa: E402
                                   to_unit_intensity)
from pretrain.data import PretrainStream, StreamConfig, load_shard_set  # noqa: E402
from pretrain.engine import EpochLoader  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def per_sample_ms(fn, samples, repeats):
    best = min(_timed(fn, samples) for _ in range(repeats))
    return 1000 * best / len(samples)


def _timed(fn, samples):
    t0 = time.perf_counter()
    for s in samples:
        fn(s)
    return time.perf_counter() - t0


def stages(folder: Path, repeats: int, batch_size: int) -> dict:
    samples = [m for p in sorted(folder.glob("*.tar")) for _, m in iter_shard(str(p))]
    roi = RoICropConfig()
    frames = [decode_image(m) for m in samples]
    props = [npy_array(m[PROPOSALS_EXT]) for m in samples]
    crops = [object_sensitive_crop(f, p, np.random.default_rng(i), roi).image for i, (f, p) in enumerate(zip(frames, props))]
    t_read = min(_timed(lambda p: sum(1 for _ in iter_shard(str(p))), sorted(folder.glob("*.tar")))
                 for _ in range(repeats)) * 1000 / len(samples)
    out = {
        "tar_read": t_read,
        "decode_frame": per_sample_ms(decode_image, samples, repeats),
        "proposals": per_sample_ms(lambda m: npy_array(m[PROPOSALS_EXT]), samples, repeats),
        "rng": per_sample_ms(lambda i: np.random.default_rng([0, 0, 0, i]), list(range(len(samples))), repeats),
        "roi_crop_resize": per_sample_ms(lambda i: object_sensitive_crop(frames[i], props[i], np.random.default_rng(i), roi),
                                         list(range(len(samples))), repeats),
        "flip": per_sample_ms(lambda c: random_hflip(c, np.random.default_rng(0)), crops, repeats),
        "to_float_normalise_per_sample": per_sample_ms(lambda c: normalize_ir(to_unit_intensity(c)), crops, repeats),
    }
    batches = [crops[i:i + batch_size] for i in range(0, len(crops) - batch_size + 1, batch_size)]
    out["to_float_normalise_batched"] = per_sample_ms(lambda b: normalize_ir(to_unit_intensity(np.stack(b))),
                                                      batches, repeats) / batch_size
    out = {k: round(v, 4) for k, v in out.items()}
    out["bytes_per_frame"] = round(sum(len(m.get("png", m.get("npy"))) for m in samples) / len(samples))
    return out


def stream_rate(folder: Path, workers: int, batches: int, batch_size: int, repeats: int, prefetch: int = 2) -> float:
    cfg = StreamConfig(batch_size=batch_size, batches_per_epoch=batches, shuffle_buffer=256)
    loader = EpochLoader(PretrainStream([load_shard_set(str(folder))], cfg, seed=0), workers, prefetch_factor=prefetch)
    rates = []
    for epoch in range(repeats + 1):
        t0 = time.perf_counter()
        n = sum(len(b["keys"]) for b in loader.epoch(epoch))
        if epoch:  # the first epoch starts the workers
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2, help="largest loader worker count")
    ap.add_argument("--batches", type=int, default=40, help="batches per timed epoch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefetch-factors", default="", help="e.g. 1,2,4: raw frames, --workers workers, each factor")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    figures = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = [Source("msrs", str(SHARED / "msrs20" / "ir")), Source("roadscene", str(SHARED / "roadscene" / "cropinfrared"))]
        cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.encoding=png", "shards.max_samples=64"])
        build_shards(sources, cfg, tmp / "png", workers=os.cpu_count() or 1, progress=False)
        reencode_shards(tmp / "png", tmp / "raw", "raw")
        for enc in ("png", "raw"):
            st = stages(tmp / enc, args.repeats, args.batch_size)
            st["sum_ms_per_sample"] = round(sum(v for k, v in st.items()
                                                if k not in ("bytes_per_frame", "to_float_normalise_per_sample")), 4)
            end_to_end = {}
            for w in range(0, args.workers + 1):
                rate = stream_rate(tmp / enc, w, args.batches, args.batch_size, args.repeats)
                end_to_end[f"{w}_workers"] = {"samples_per_s": round(rate, 1),
                                              "per_core": round(rate / max(w, 1), 1)}
            per_core = end_to_end["0_workers"]["samples_per_s"]  # one process, one core
            if enc == "raw" and args.prefetch_factors and args.workers:
                end_to_end["prefetch_factor"] = {
                    f: round(stream_rate(tmp / enc, args.workers, args.batches, args.batch_size, args.repeats, int(f)), 1)
                    for f in args.prefetch_factors.split(",")}
            figures[enc] = {"stages_ms_per_sample": st, "stream": end_to_end,
                            "cores_per_gpu_at_2000_per_s": round(2000 / per_core, 1),
                            "cores_per_gpu_at_6000_per_s": round(6000 / per_core, 1)}
    figures["speedup_raw_vs_png_per_core"] = round(figures["raw"]["stream"]["0_workers"]["samples_per_s"]
                                                   / figures["png"]["stream"]["0_workers"]["samples_per_s"], 2)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
