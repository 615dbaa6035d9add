"""Offline region proposals (SPEC §2): selective search with PAD's settings and filters.

We use OpenCV's C++ selective search (opencv-contrib) rather than the pure-Python package PAD
called, for speed: Felzenszwalb graph segmentation with PAD's scale k=600, sigma 0.9 and
min_size 30, grouped with the colour + fill + size + texture similarities (the same four that
package uses). Two differences, both documented:
- OpenCV reports boxes, not region pixel counts, so PAD's ">= 600 region pixels" filter is applied
  to box area; with w >= 40 and h >= 40 every kept box has >= 1600 px, so it never binds anyway.
- OpenCV ranks regions with C ``rand()``, so its output order varies between calls; the set of
  boxes does not. We sort the unique boxes, which makes proposals deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from data_tools.transforms import to_unit_intensity


@dataclass(frozen=True)
class ProposalConfig:
    enabled: bool = True
    scale: float = 600.0  # Felzenszwalb k
    sigma: float = 0.9
    min_size: int = 30
    min_region_pixels: int = 600
    min_side: int = 40
    max_aspect: float = 3.0
    # Run selective search on a copy whose longer side is at most this (None: full resolution,
    # as PAD does). Boxes are scaled back. A speed option for very large frames.
    max_side: int | None = None


def selective_search(image_u8: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    """Unique selective-search boxes (N, 4) int32 xywh, sorted, on a grey or BGR uint8 image."""
    seg = cv2.ximgproc.segmentation
    bgr = image_u8 if image_u8.ndim == 3 else cv2.cvtColor(image_u8, cv2.COLOR_GRAY2BGR)
    factor = 1.0
    if cfg.max_side and max(bgr.shape[:2]) > cfg.max_side:
        factor = max(bgr.shape[:2]) / cfg.max_side
        size = (round(bgr.shape[1] / factor), round(bgr.shape[0] / factor))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    ss.clearGraphSegmentations()
    ss.addGraphSegmentation(seg.createGraphSegmentation(cfg.sigma, cfg.scale, cfg.min_size))
    ss.clearStrategies()
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(
        seg.createSelectiveSearchSegmentationStrategyColor(),
        seg.createSelectiveSearchSegmentationStrategyFill(),
        seg.createSelectiveSearchSegmentationStrategySize(),
        seg.createSelectiveSearchSegmentationStrategyTexture()))
    ss.clearImages()
    ss.addImage(bgr)
    boxes = np.asarray(ss.process(), np.float64).reshape(-1, 4)
    if factor != 1.0:
        boxes = np.round(boxes * factor)
    return unique_boxes(boxes)


def filter_proposals(boxes: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    """PAD's filter: area >= min_region_pixels, w >= 40, h >= 40, aspect <= 3."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4)
    w = boxes[:, 2].astype(np.float64)
    h = boxes[:, 3].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.maximum(w / h, h / w)
    keep = (w * h >= cfg.min_region_pixels) & (w >= cfg.min_side) & (h >= cfg.min_side) & (aspect <= cfg.max_aspect)
    return boxes[keep]


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros((0, 4), np.int32)
    return np.unique(np.round(boxes).astype(np.int32), axis=0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """What selective search sees: 8-bit frames as they are, 16-bit frames through the same
    load-time normalisation the network input uses."""
    if image.dtype == np.uint8:
        return image
    return (to_unit_intensity(image) * 255.0 + 0.5).astype(np.uint8)


def compute_proposals(image: np.ndarray, cfg: ProposalConfig) -> np.ndarray:
    if not cfg.enabled:
        return np.zeros((0, 4), np.int32)
    return filter_proposals(selective_search(to_uint8(image), cfg), cfg)
