"""Joint augmentation of aligned infrared / visible frames and their targets (label maps or
boxes): the same geometric transform for all, photometric distortion on the visible frame only.
Every draw comes from the generator passed in (seeded per sample by the caller).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# timm's IMAGENET_DEFAULT_MEAN / _STD, written out (a test compares them): importing timm.data.constants
# imports all of timm and torchvision, 2.5 s in every data-loader worker that imports this module.
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random rescale of the frame
    hflip: float = 0.5
    photometric: bool = True  # visible only: brightness, contrast, saturation, hue (each with p 0.5)


def rescale(arrays: dict, ratio: float) -> dict:
    """Resize images bilinearly and label maps nearest; scale boxes (x1, y1, x2, y2)."""
    out = {}
    for key, a in arrays.items():
        if a is None:
            out[key] = None
        elif key == "boxes":
            out[key] = a * ratio
        else:
            h, w = a.shape[:2]
            size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
            interp = cv2.INTER_NEAREST if key == "label" else cv2.INTER_LINEAR
            r = cv2.resize(a.astype(np.int32) if key == "label" else a, size, interpolation=interp)
            out[key] = r.astype(a.dtype)
    return out


def crop(arrays: dict, y: int, x: int, ch: int, cw: int, fill: dict) -> dict:
    """Crop (y, x, ch, cw), padding past the border with ``fill[key]``; boxes shifted (not clipped)."""
    out = {}
    for key, a in arrays.items():
        if a is None:
            out[key] = None
        elif key == "boxes":
            out[key] = a - np.array([x, y, x, y], np.float32)
        else:
            piece = a[y:y + ch, x:x + cw]
            if piece.shape[:2] != (ch, cw):
                canvas = np.full((ch, cw) + a.shape[2:], fill.get(key, 0), a.dtype)
                canvas[: piece.shape[0], : piece.shape[1]] = piece
                piece = canvas
            out[key] = piece
    return out


def hflip(arrays: dict, width: int) -> dict:
    out = {}
    for key, a in arrays.items():
        if a is None:
            out[key] = None
        elif key == "boxes":
            b = a.copy()
            b[:, [0, 2]] = width - a[:, [2, 0]]
            out[key] = b
        else:
            out[key] = np.ascontiguousarray(a[:, ::-1])
    return out


def photometric(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmsegmentation's PhotoMetricDistortion: brightness +-32, contrast 0.5-1.5, saturation 0.5-1.5,
    hue +-18 degrees, each applied with probability 0.5."""
    img = rgb.astype(np.float32)
    if rng.uniform() < 0.5:
        img = img + rng.uniform(-32, 32)
    if rng.uniform() < 0.5:
        img = img * rng.uniform(0.5, 1.5)
    img = np.clip(img, 0, 255).astype(np.uint8)
    saturation = rng.uniform(0.5, 1.5) if rng.uniform() < 0.5 else 1.0
    hue = rng.uniform(-9, 9) if rng.uniform() < 0.5 else 0.0  # OpenCV hue is in [0, 180): 9 = 18 degrees
    if saturation != 1.0 or hue != 0.0:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        hsv[..., 0] = (hsv[..., 0] + hue) % 180
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return img


def normalize_visible(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 with ImageNet statistics."""
    return ((rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


def network_inputs(ir: np.ndarray | None, vi: np.ndarray | None, intensity, ir_mean: float, ir_std: float) -> dict:
    """{'ir': (1, H, W), 'vi': (3, H, W)} float32 network inputs of the frames present."""
    from data_tools.transforms import normalize_ir, to_unit_intensity

    out = {}
    if ir is not None:
        out["ir"] = normalize_ir(to_unit_intensity(ir, intensity), ir_mean, ir_std)[None].astype(np.float32)
    if vi is not None:
        out["vi"] = normalize_visible(vi)
    return out
