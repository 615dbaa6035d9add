"""Shard-stage throughput: proposals, whole builds with 1 and 2 workers, and shard reading.

    python bench/bench_shards.py [--frames N] [--repeats R]

Prints frames/s (median of R repeats) on the real RoadScene infrared frames in ../shared/data
(or any folder given with --root). Bars (issue 2): the loader (WebDataset read + decode + RoI crop
+ resize to 224) >= 0.7x pure PNG decode of the same bytes; 2 build workers >= 1.8x one worker.
"""
from __future__ import annotations

import argparse
import json
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
from data_tools.imageio import decode_png, read_frame  # noqa: E402
from data_tools.proposals import ProposalConfig, compute_proposals  # noqa: E402
from data_tools.shards import decode_sample, iter_shard  # noqa: E402
from data_tools.sources import Source, discover  # noqa: E402
from data_tools.transforms import object_sensitive_crop  # noqa: E402


def _median_rate(fn, n_items: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n_items / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared/data/roadscene/cropinfrared"))
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cv2.setNumThreads(1)

    available = len(discover(Source("bench", args.root)).items)
    source = Source("bench", args.root, stride=max(1, available // args.frames))
    items = discover(source).items
    n = len(items)
    frames = [read_frame(it.path).image for it in items]
    size = f"{frames[0].shape[1]}x{frames[0].shape[0]}"

    pcfg = ProposalConfig()
    proposals_fps = _median_rate(lambda: [compute_proposals(f, pcfg) for f in frames], len(frames), args.repeats)

    cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=32", "shards.encoding=png"])
    build_fps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            def run(w=workers):
                out = Path(tmp) / f"w{w}-{time.perf_counter_ns()}"
                build_shards([source], cfg, out, workers=w, progress=False)
            build_fps[workers] = _median_rate(run, n, args.repeats)

        out = Path(tmp) / "read"
        manifest = build_shards([source], cfg, out, workers=2, progress=False)
        urls = [str(out / e["shard"]) for e in manifest["shards"]]
        pngs = [members["png"] for url in urls for _, members in iter_shard(url)]

        def pure_decode():
            for data in pngs:
                decode_png(data)

        def loader():
            import webdataset as wds  # here, not at the top: spawned build workers re-import this script

            rng = np.random.default_rng(0)
            ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None)
            for sample in ds:
                image, proposals, _ = decode_sample({k: v for k, v in sample.items() if not k.startswith("__")})
                object_sensitive_crop(image, proposals, rng)

        decode_fps = _median_rate(pure_decode, len(pngs), args.repeats)
        loader_fps = _median_rate(loader, len(pngs), args.repeats)

    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "frames": n, "frame_size": size,
        "proposals_fps_1proc": round(proposals_fps, 1),
        "build_fps_1_worker": round(build_fps[1], 1),
        "build_fps_2_workers": round(build_fps[2], 1),
        "build_speedup_2_vs_1": round(build_fps[2] / build_fps[1], 2),
        "pure_decode_fps": round(decode_fps, 1),
        "loader_fps_decode_crop_resize224": round(loader_fps, 1),
        "loader_vs_decode": round(loader_fps / decode_fps, 2),
    }
    print(json.dumps(figures, indent=1))
    print(f"bars: loader/decode {figures['loader_vs_decode']} (>= 0.7), "
          f"2 workers/1 worker {figures['build_speedup_2_vs_1']} (>= 1.8)")


if __name__ == "__main__":
    main()
