"""Listing a corpus source at the scale of PAD's MSIP corpus: how long the shard builder's ``discover``
takes on a dataset root that holds both halves of an infrared-visible set (no image is read).

    python bench/bench_source_discover.py [--frames 20000,178000] [--repeats 3]

For each N, a temporary KAIST-like tree gets N empty infrared frames and N visible ones
(``setSS/VVVV/lwir/`` and ``setSS/VVVV/visible/``, 1,000 frames a sequence); prints the median
seconds of ``discover`` (the folder walk, a stat per frame, the rule that leaves the visible half
out, the check for the same frames in two infrared folders), the frames found and those left out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.sources import Source, discover  # noqa: E402

PER_SEQUENCE = 1000


def make_tree(root: Path, frames: int) -> None:
    for start in range(0, frames, PER_SEQUENCE):
        sequence = root / f"set{start // (20 * PER_SEQUENCE):02d}" / f"V{(start // PER_SEQUENCE) % 20:03d}"
        for modality in ("lwir", "visible"):
            (sequence / modality).mkdir(parents=True)
            for i in range(min(PER_SEQUENCE, frames - start)):
                (sequence / modality / f"I{i:05d}.jpg").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="20000,178000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'frames':>8} {'found':>8} {'left out':>9} {'seconds (median)':>18}")
    for frames in (int(v) for v in args.frames.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            make_tree(Path(tmp), frames)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                found = discover(Source("kaist", tmp))
                times.append(time.perf_counter() - start)
        left_out = sum(found.other_modalities_left_out.values())
        print(f"{frames:>8} {len(found.items):>8} {left_out:>9} {statistics.median(times):>18.3f}")


if __name__ == "__main__":
    main()
