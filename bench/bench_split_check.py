"""Checking every frame of a detection split before training (each pair read and decoded once, its
size taken): seconds per pair on 1, 2, ... threads.

    python bench/bench_split_check.py [--pairs 400] [--threads 1,2] [--size 640x512]

A temporary folder gets ``--pairs`` infrared (grey) and visible (colour) JPEG pairs of ``--size``
(KAIST's 640x512 by default; LLVIP: 1280x1024) with one YOLO box each; ``build_records`` runs on
k threads for each k (``finetune.data.threads.frame_threads``), three times; prints the median and the records kept.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.data.det import build_records  # noqa: E402
from finetune.data import threads as frame_threads  # noqa: E402
from finetune.data.pairs import discover  # noqa: E402


def make_pairs(root: Path, pairs: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur((rng.random((height, width, 3)) * 255).astype(np.uint8), (0, 0), 3)
    for folder in ("ir", "vi", "labels"):
        (root / folder).mkdir()
    for i in range(pairs):
        cv2.imwrite(str(root / "ir" / f"{i:06d}.jpg"), frame[:, :, 0])
        cv2.imwrite(str(root / "vi" / f"{i:06d}.jpg"), frame)
        (root / "labels" / f"{i:06d}.txt").write_text("0 0.5 0.5 0.1 0.2\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--size", default="640x512", help="WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_pairs(root, args.pairs, width, height)
        data = OmegaConf.create({"layout": "pairs", "root": str(root), "label_suffix": "", "name_suffixes": {},
                                 "dirs": {"ir": "ir", "vi": "vi", "label": None, "image": None}})
        boxes = OmegaConf.create({"format": "yolo", "path": str(root / "labels")})
        pairs, _, _ = discover(data, None, need_label=False)
        print(f"{'threads':>8} {'kept':>6} {'seconds':>8} {'ms per pair':>12}")
        for threads in (int(v) for v in args.threads.split(",")):
            frame_threads.frame_threads = lambda k=threads: k
            times = []
            for _ in range(3):
                start = time.perf_counter()
                records, _ = build_records(pairs, boxes, ("person",))
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            print(f"{threads:>8} {len(records):>6} {seconds:>8.2f} {1000 * seconds / len(pairs):>12.2f}")


if __name__ == "__main__":
    main()
