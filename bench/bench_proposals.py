"""Proposal speed per frame on one core, side by side: PAD's proposal step (a faithful
re-implementation: the ``selectivesearch`` package PAD calls, its settings and filters, and its
pass over the label image) against our whole shard build per frame (read + decode, proposals,
PNG encode, sample encode) with each ``proposals.method``.

    pip install selectivesearch          # bench-only dependency (pulls scikit-image)
    python bench/bench_proposals.py [--root DIR] [--frames N] [--repeats R] [--ranker FILE]

Prints seconds per frame (median over frames of the best of R repeats) and the speed-up of each
of our methods' whole per-frame build over PAD's proposal step alone; the default's build on a
source where a burned-in overlay was found (the synthetic one of ``synth.burn_in_overlay``, filled
in before the proposals); also ``thermal_blobs`` on a frame of uniform noise of the same size (the
worst case: thousands of blobs) and the process's peak memory before and after it. One process, one OpenCV
thread. Default frames: the 20 real MSRS infrared frames (640x480) in ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core for numpy / scikit-image too

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.build import _init_worker, process_item  # noqa: E402
from data_tools.cli import DEFAULT_BUILD_CONFIG  # noqa: E402
from data_tools.config import load_config, to_container  # noqa: E402
from data_tools.proposal_eval import runnable_methods  # noqa: E402
from data_tools.proposals import ProposalConfig, compute_proposals  # noqa: E402
from data_tools.imageio import read_frame  # noqa: E402
from data_tools.overlay import find_overlay  # noqa: E402
from data_tools.sources import Source, discover  # noqa: E402
from data_tools.synth import burn_in_overlay  # noqa: E402
from data_tools.transforms import to_uint8  # noqa: E402


def pad_proposal_step(path: str) -> set:
    """PAD's roi.py for one frame: cv2.imread (BGR), selectivesearch with scale 600, sigma 0.9,
    min_size 30, its walk over the label image, then its filters (size >= 600, w and h >= 40,
    aspect <= 3)."""
    import selectivesearch

    img = cv2.imread(path)
    img_lbl, regions = selectivesearch.selective_search(img, scale=600, sigma=0.9, min_size=30)
    labels = set()
    for i in range(img_lbl.shape[0]):
        for j in range(img_lbl.shape[1]):
            labels.add(img_lbl[i, j, 3])
    candidates = set()
    for r in regions:
        if r["rect"] in candidates or r["size"] < 600:
            continue
        x, y, w, h = r["rect"]
        if w < 40 or h < 40 or w / h > 3 or h / w > 3:
            continue
        candidates.add(r["rect"])
    return candidates


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared/data/msrs20/ir"))
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pad-repeats", type=int, default=1, help="PAD's step is slow: repeats for it")
    ap.add_argument("--ranker", help="a proposals-fit ranker, to time thermal_blobs_fitted too")
    args = ap.parse_args()
    cv2.setNumThreads(1)

    source = Source("bench", args.root)
    items = discover(source).items[: args.frames]
    cfg = to_container(load_config(DEFAULT_BUILD_CONFIG))
    size = cv2.imread(items[0].path, cv2.IMREAD_UNCHANGED).shape

    per_method = {}
    for method in runnable_methods(ProposalConfig(ranker=args.ranker)):
        mcfg = dict(cfg, proposals=dict(cfg["proposals"], method=method, ranker=args.ranker),
                    _source_offsets={"bench": 0})
        tasks = [(i, it, source, [], None, mcfg) for i, it in enumerate(items)]
        per_method[method] = statistics.median(best_of(lambda t=t: process_item(t), args.repeats) for t in tasks)

    figures = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, one process, one thread",
               "frames": len(items), "frame_size": f"{size[1]}x{size[0]}",
               "ours_build_seconds_per_frame": {m: round(s, 4) for m, s in per_method.items()}}
    # The fill's cost: the mask the build finds on these frames with an overlay burned in, given to
    # the build as to its workers (the cost depends on the mask, not on what lies under it).
    finding = find_overlay([burn_in_overlay(to_uint8(read_frame(it.path).image)) for it in items])
    if finding.mask is not None:
        _init_worker({"bench": finding.mask})
        mcfg = dict(cfg, _source_offsets={"bench": 0})
        filled = statistics.median(best_of(lambda t=t: process_item(t), args.repeats)
                                   for t in [(i, it, source, [], None, mcfg) for i, it in enumerate(items)])
        _init_worker({})
        figures["thermal_blobs_build_seconds_per_frame_overlay_filled"] = {
            "seconds": round(filled, 4), "overlay_share": round(finding.share, 4)}
    # Worst case for blob extraction: uniform noise gives thousands of components per mask.
    noise = np.random.default_rng(0).integers(0, 256, size[:2], dtype=np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    figures["thermal_blobs_noise_frame_seconds"] = round(
        best_of(lambda: compute_proposals(noise, ProposalConfig()), args.repeats), 3)
    figures["peak_rss_mb_before_after_noise_frame"] = [
        round(before / 1024), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)]
    try:
        pad = statistics.median(best_of(lambda p=it.path: pad_proposal_step(p), args.pad_repeats) for it in items)
        figures["pad_proposal_step_seconds_per_frame"] = round(pad, 3)
        figures["speedup_vs_pad"] = {m: round(pad / s, 1) for m, s in per_method.items()}
    except ImportError:
        figures["pad_proposal_step_seconds_per_frame"] = "not measured: pip install selectivesearch"
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
