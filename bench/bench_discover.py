"""Listing a fine-tuning split at the size of the public benchmarks: how long ``discover`` takes to
pair the infrared, visible and label files of N frames named by a split list (no image is read).

    python bench/bench_discover.py [--frames 2000,10000,25000] [--repeats 3]

For each N, a temporary folder gets N empty infrared, visible and label files (``ir/``, ``vi/``,
``labels/``) and a split list naming them all plus 1% names without files; prints the median
seconds of ``discover`` and the frames it paired. KAIST's train-all-02 list names 25,076 frames,
LLVIP 12,025, FLIR v2 10,742.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.data.pairs import discover  # noqa: E402


def make_split(root: Path, frames: int) -> None:
    names = [f"{i:06d}" for i in range(frames)]
    for folder in ("ir", "vi", "labels"):
        (root / folder).mkdir(parents=True)
        for name in names:
            (root / folder / f"{name}.png").touch()
    absent = [f"x{i:06d}" for i in range(max(frames // 100, 1))]
    (root / "train.txt").write_text("\n".join(names + absent) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="2000,10000,25000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'frames':>8} {'paired':>8} {'seconds (median)':>18}")
    for frames in (int(v) for v in args.frames.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_split(root, frames)
            data = OmegaConf.create({"layout": "pairs", "root": str(root), "label_suffix": "",
                                     "dirs": {"ir": "ir", "vi": "vi", "label": "labels", "image": None},
                                     "name_suffixes": {"ir": "", "vi": ""}})
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                records, _, _ = discover(data, "train.txt")
                times.append(time.perf_counter() - start)
        print(f"{frames:>8} {len(records):>8} {statistics.median(times):>18.3f}")


if __name__ == "__main__":
    main()
