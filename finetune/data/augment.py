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
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random rescale: of data.img_scale, or of the frame
    hflip: float = 0.5
    photometric: bool = True  # visible only: mmsegmentation's brightness, contrast, saturation, hue
    photometric_ir: bool = False  # brightness and contrast on the infrared frame too (PAD's thermal pipeline)
    cat_max_ratio: float = 1.0  # < 1: crops redrawn (up to 10 times) while one class fills more of them


def scale_factor(height: int, width: int, ratio: float, img_scale: tuple[int, int] | None) -> float:
    """mmsegmentation's ``Resize(img_scale, ratio_range, keep_ratio=True)``: the factor that makes the
    frame as large as fits in (long, short) = img_scale x ratio (for 480x640 and (2048, 512): short
    side 512 x ratio); without img_scale, ratio x the frame's own size."""
    if img_scale is None:
        return ratio
    long_edge, short_edge = int(max(img_scale) * ratio), int(min(img_scale) * ratio)
    return min(long_edge / max(height, width), short_edge / min(height, width))


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(height, width) x factor, rounded half up as mmcv's rescale."""
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def crop_corner(label: np.ndarray, crop_size: tuple[int, int], rng: np.random.Generator, cat_max_ratio: float,
                ignore_index: int) -> tuple[int, int]:
    """mmsegmentation's ``RandomCrop(crop_size, cat_max_ratio)``: a uniform corner; with cat_max_ratio
    < 1, redrawn up to 10 times until no class holds that share of the crop's labelled pixels (the
    last draw is kept either way)."""
    (h, w), (ch, cw) = label.shape, crop_size

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

    y, x = draw()
    for _ in range(10 if cat_max_ratio < 1 else 0):
        piece = label[y:y + ch, x:x + cw]
        counts = np.bincount(piece[piece != ignore_index].ravel().astype(np.int64))
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        y, x = draw()
    return y, x


def rescale(arrays: dict, ratio: float) -> dict:
    """Resize images bilinearly and label maps nearest; scale boxes (x1, y1, x2, y2)."""
    out = {}
    for key, a in arrays.items():
        if a is None:
            out[key] = None
        elif key == "boxes":
            out[key] = a * ratio
        else:
            h, w = scaled_size(*a.shape[:2], ratio)
            size = (w, h)
            interp = cv2.INTER_NEAREST if key == "label" else cv2.INTER_LINEAR
            r = cv2.resize(a.astype(np.int32) if key == "label" else a, size, interpolation=interp)
            out[key] = r.astype(a.dtype)
    return out


def crop(arrays: dict, y: int, x: int, ch: int, cw: int) -> dict:
    """The (y, x, ch, cw) window of each array, smaller where it passes the frame's bottom or right
    edge (``pad_inputs`` fills it after normalisation); boxes shifted (not clipped)."""
    out = {}
    for key, a in arrays.items():
        if a is None:
            out[key] = None
        elif key == "boxes":
            out[key] = a - np.array([x, y, x, y], np.float32)
        else:
            out[key] = a[y:y + ch, x:x + cw]
    return out


def pad_inputs(sample: dict, height: int, width: int, label_fill: int = 0) -> dict:
    """A sample's network inputs ('ir', 'vi': (C, H, W), normalised) padded at the bottom / right to
    (height, width) with 0, the normalised mean, as mmsegmentation pads after Normalize and
    detectron2's ImageList pads normalised images (ViTDet): a padded border reads as an average
    frame, not as black; its 'label' map, if any, with ``label_fill``."""
    out = dict(sample)
    for key in ("ir", "vi", "label"):
        a = sample.get(key)
        if a is None or a.shape[-2:] == (height, width):
            continue
        h, w = a.shape[-2:]
        pad = [(0, 0)] * (a.ndim - 2) + [(0, height - h), (0, width - w)]
        out[key] = np.pad(a, pad, constant_values=label_fill if key == "label" else 0)
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
    """mmsegmentation's PhotoMetricDistortion on an 8-bit RGB frame, step by step as it runs: brightness
    +-32; then contrast 0.5-1.5 either first or last (a coin), around saturation 0.5-1.5 and hue +-18 in
    OpenCV's units (whole units of 2 degrees: up to 36 degrees); each applied with probability 0.5 and
    each clipped and cut back to 8 bits."""
    img = _brightness(rgb, rng, 255.0)
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        img = _contrast(img, rng, 255.0)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], 255.0, alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-18, 18))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        img = _contrast(img, rng, 255.0)
    return img


def _convert(img: np.ndarray, top: float, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """img x alpha + beta clipped to [0, top] (mmsegmentation's ``convert``): an 8-bit image is cut back
    to 8 bits after every step, as there; a float one (a 16-bit frame in [0, 1]) stays float."""
    out = np.clip(img.astype(np.float32) * alpha + beta, 0.0, top)
    return out.astype(np.uint8) if img.dtype == np.uint8 else out


def _brightness(img: np.ndarray, rng: np.random.Generator, top: float) -> np.ndarray:
    return _convert(img, top, beta=rng.uniform(-32, 32) * top / 255.0) if rng.integers(2) else img


def _contrast(img: np.ndarray, rng: np.random.Generator, top: float) -> np.ndarray:
    return _convert(img, top, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img


def photometric_infrared(ir: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PhotoMetricDistortion as PAD's thermal-only pipeline applies it to its grey frames, where
    saturation and hue change nothing: brightness, then contrast, on 8 bits (an 8-bit frame) or on
    [0, 1] (a 16-bit frame, normalised as a whole when read)."""
    top = 255.0 if ir.dtype == np.uint8 else 1.0
    return _contrast(_brightness(ir, rng, top), rng, top)


def normalize_visible(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 with ImageNet statistics."""
    return ((rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


def whole_frame_intensity(frames: dict, intensity) -> dict:
    """The frames with a 16-bit infrared frame brought to [0, 1] (float32) as a whole, as soon as it
    is read: its percentiles (or min / max) are the frame's, as at pre-training, not those of a crop
    or of a frame padded with zeros. 8-bit frames stay 8-bit (resizes and photometric steps round
    to 8 bits as mmsegmentation's do)."""
    from data_tools.transforms import to_unit_intensity

    ir = frames.get("ir")
    if ir is None or ir.dtype != np.uint16:
        return frames
    return dict(frames, ir=to_unit_intensity(ir, intensity))


def network_inputs(ir: np.ndarray | None, vi: np.ndarray | None, intensity, ir_mean: float, ir_std: float) -> dict:
    """{'ir': (1, H, W), 'vi': (3, H, W)} float32 network inputs of the frames present; ``ir`` 8- or
    16-bit as read, or float32 in [0, 1] (:func:`whole_frame_intensity`)."""
    from data_tools.transforms import normalize_ir, to_unit_intensity

    out = {}
    if ir is not None:
        unit = ir if ir.dtype == np.float32 else to_unit_intensity(ir, intensity)
        out["ir"] = normalize_ir(unit, ir_mean, ir_std)[None].astype(np.float32)
    if vi is not None:
        out["vi"] = normalize_visible(vi)
    return out
