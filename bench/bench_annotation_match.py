"""Matching annotation files to frames at the size of a tracking corpus: how long the shard
builder's ``assign_to_images`` takes for N frames in per-sequence folders whose annotation files
sit in a tree of the same sequence folders (LSOTB-TIR's training set: 1,280 sequences, ~600k frames;
nothing is read from disk).

    python bench/bench_annotation_match.py [--sequences 1280] [--frames-per-sequence 470] [--repeats 3]

Prints the median seconds and how many frames got their own file.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.annotations import AnnotationSet, assign_to_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=1280)
    parser.add_argument("--frames-per-sequence", type=int, default=470)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    anns, images = AnnotationSet(), {}
    for s in range(args.sequences):
        folder = f"class{s % 47}/seq{s:04d}"
        for f in range(args.frames_per_sequence):
            anns.boxes[f"{folder}/{f:08d}"] = []
            images[f"Data/{folder}/{f:08d}.jpg"] = f"/data/lsotb/TrainingData/Data/{folder}/{f:08d}.jpg"
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        assigned, issues = assign_to_images(anns, images, "images of the source")
        times.append(time.perf_counter() - start)
    print(f"{len(images)} frames, {len(anns.boxes)} annotation files: {statistics.median(times):.2f} s "
          f"(median of {args.repeats}); {len(assigned)} frames matched, {len(issues)} issues")


if __name__ == "__main__":
    main()
