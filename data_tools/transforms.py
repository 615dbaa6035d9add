"""Online transforms applied when a sample is drawn: PAD's object-sensitive random RoI crop
(PAD, arXiv 2312.08192), horizontal flip, and the load-time intensity normalisation of 8/16-bit frames.

Numpy + OpenCV only, so the data loader needs no torch in its workers; every random choice comes
from the ``numpy.random.Generator`` passed in, so a seeded generator replays the same crops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# PAD's infrared normalisation, applied to intensities already in [0, 1].
IR_MEAN = 0.3801
IR_STD = 0.1871


@dataclass(frozen=True)
class RoICropConfig:
    p: float = 0.85  # a draw wants a large crop when uniform() > p
    tries: int = 20
    min_proposal_side: int = 40
    center_jitter: float = 0.4  # centre moves by w * U(-j, j), h * U(-j, j)
    scale_min: float = 0.7
    scale_max: float = 1.5
    min_crop_side: int = 60
    big_area_ratio: float = 0.15
    fallback_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop fallback
    fallback_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    output_size: tuple[int, int] = (224, 224)  # (height, width)


@dataclass(frozen=True)
class CropResult:
    image: np.ndarray  # resized to output_size
    box: tuple[int, int, int, int]  # x, y, w, h in the source frame
    need_big: bool
    fallback: bool  # True when RandomResizedCrop was used


def _proposal_box(proposals: np.ndarray, width: int, height: int, need_big: bool,
                  cfg: RoICropConfig, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    for _ in range(cfg.tries):
        x, y, w, h = (float(v) for v in proposals[rng.integers(len(proposals))])
        if x < 0 or y < 0 or x + w > width or y + h > height or w < cfg.min_proposal_side or h < cfg.min_proposal_side:
            continue
        cx = x + w / 2 + w * rng.uniform(-cfg.center_jitter, cfg.center_jitter)
        cy = y + h / 2 + h * rng.uniform(-cfg.center_jitter, cfg.center_jitter)
        nw = max(w * rng.uniform(cfg.scale_min, cfg.scale_max), cfg.min_crop_side)
        nh = max(h * rng.uniform(cfg.scale_min, cfg.scale_max), cfg.min_crop_side)
        x1, y1 = max(0, round(cx - nw / 2)), max(0, round(cy - nh / 2))
        x2, y2 = min(width, round(cx + nw / 2)), min(height, round(cy + nh / 2))
        if x2 - x1 < cfg.min_crop_side or y2 - y1 < cfg.min_crop_side:
            continue
        if need_big and (x2 - x1) * (y2 - y1) / (width * height) < cfg.big_area_ratio:
            continue
        return x1, y1, x2 - x1, y2 - y1
    return None


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, re-implemented on a numpy Generator so that the
    loader stays torch-free and seeded (same algorithm: 10 tries, log-uniform ratio, centre crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def object_sensitive_crop(image: np.ndarray, proposals: np.ndarray, rng: np.random.Generator,
                          cfg: RoICropConfig = RoICropConfig()) -> CropResult:
    """PAD's object-sensitive random RoI crop, resized to ``cfg.output_size`` (aspect not kept)."""
    height, width = image.shape[:2]
    need_big = rng.uniform() > cfg.p
    box = _proposal_box(proposals, width, height, need_big, cfg, rng) if len(proposals) else None
    fallback = box is None
    if fallback:
        box = random_resized_crop_box(width, height, cfg.fallback_scale, cfg.fallback_ratio, rng)
    x, y, w, h = box
    out_h, out_w = cfg.output_size
    crop = cv2.resize(image[y : y + h, x : x + w], (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    return CropResult(crop, box, need_big, fallback)


def random_hflip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1]) if rng.uniform() < p else image


@dataclass(frozen=True)
class IntensityConfig:
    """How stored integers become network intensities in [0, 1] (before mean/std).

    uint8 frames: divided by 255. uint16 (radiometric) frames use ``uint16_mode``:
    ``percentile`` (default) maps the frame's [p_low, p_high] percentiles to [0, 1] and clips,
    because raw counts usually occupy a narrow band of the 16-bit range; ``range`` divides by
    65535; ``minmax`` maps the frame's own min/max to [0, 1].
    """
    uint16_mode: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)


def to_unit_intensity(image: np.ndarray, cfg: IntensityConfig = IntensityConfig()) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype != np.uint16:
        raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")
    x = image.astype(np.float32)
    if cfg.uint16_mode == "range":
        return x / 65535.0
    if cfg.uint16_mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif cfg.uint16_mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, cfg.percentiles))
    else:
        raise ValueError(f"unknown uint16_mode {cfg.uint16_mode!r}")
    return np.clip((x - lo) / max(hi - lo, 1.0), 0.0, 1.0)


def normalize_ir(unit: np.ndarray, mean: float = IR_MEAN, std: float = IR_STD) -> np.ndarray:
    return (unit - mean) / std


# --- for people and 8-bit algorithms ------------------------------------------------------------

def to_uint8(image: np.ndarray) -> np.ndarray:
    """A frame as 8 bits: 8-bit frames as they are, 16-bit frames through the same load-time
    normalisation the network input uses (what previews show and proposal methods see)."""
    if image.dtype == np.uint8:
        return image
    return (to_unit_intensity(image) * 255.0 + 0.5).astype(np.uint8)


def stretch_to_uint8(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Network inputs or outputs (normalised floats) as uint8, ``lo``..``hi`` (default: their own
    range) stretched to 0..255: how overlays and reconstruction previews show them."""
    x = np.asarray(values, dtype=np.float32)
    lo = float(x.min()) if lo is None else float(lo)
    hi = float(x.max()) if hi is None else float(hi)
    return (np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * 255.0).astype(np.uint8)
