"""Faster R-CNN's RoI pooling: detectron2's ROIAlignV2 (finetune.models.rcnn_rules.AlignedRoIPool:
half-pixel aligned, sampling points adapted to each box) against torchvision's MultiScaleRoIAlign
(unaligned, 2 x 2 points a bin), on the pyramid of a ViT-B frame: milliseconds per forward + backward
of the sampled RoIs of a training batch.

    python bench/bench_roi_pool.py [--img 1024] [--channels 256] [--rois 512] [--batch 2] [--repeats 5]
                                   [--device cpu]

RoIs are drawn with sides from 8 px to the frame's, log-uniform (seeded).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from finetune.models.rcnn_rules import AlignedRoIPool  # noqa: E402

NAMES, STRIDES = ["p2", "p3", "p4", "p5"], (4, 8, 16, 32)


def random_boxes(n: int, img: int, generator: torch.Generator) -> torch.Tensor:
    sides = torch.exp(torch.empty(n, 2).uniform_(math.log(8.0), math.log(img), generator=generator))
    corner = torch.rand(n, 2, generator=generator) * (img - sides)
    return torch.cat([corner, corner + sides], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--rois", type=int, default=512, help="per image")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    features = {n: torch.randn(args.batch, args.channels, args.img // s, args.img // s, generator=g)
                .to(args.device).requires_grad_() for n, s in zip(NAMES, STRIDES)}
    boxes = [random_boxes(args.rois, args.img, g).to(args.device) for _ in range(args.batch)]
    shapes = [(args.img, args.img)] * args.batch
    pools = {"torchvision (unaligned, 2 x 2)": MultiScaleRoIAlign(NAMES, 7, 2),
             "detectron2 ROIAlignV2 (aligned, adaptive)": AlignedRoIPool(NAMES, STRIDES)}
    for name, pool in pools.items():
        times = []
        for _ in range(args.repeats + 1):
            if args.device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            pool(features, boxes, shapes).square().mean().backward()
            if args.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"{name}: {1000 * statistics.median(times[1:]):.1f} ms per forward + backward "
              f"({args.batch} x {args.rois} RoIs, {args.img} px, {args.channels} channels, {args.device}, "
              f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
