"""Overlay PNGs: predictions and ground truth drawn on the infrared and visible frames."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data_tools.imageio import write_png
from data_tools.transforms import stretch_to_uint8


def palette(num: int) -> np.ndarray:
    """Distinct RGB colours, fixed (class 0 is drawn too; background stays transparent in overlays)."""
    rng = np.random.default_rng(12345)
    base = np.array([[0, 0, 0], [128, 64, 128], [220, 20, 60], [0, 0, 142], [250, 170, 30], [107, 142, 35],
                     [70, 130, 180], [255, 255, 0], [0, 255, 255]], np.uint8)
    extra = rng.integers(40, 256, size=(max(num - len(base), 0), 3), dtype=np.uint8)
    return np.concatenate([base, extra])[:max(num, 1)]


def displayable(image: np.ndarray) -> np.ndarray:
    """A normalised (C, H, W) network input as (H, W, 3) uint8 RGB, stretched to its own range."""
    x = stretch_to_uint8(image).transpose(1, 2, 0)
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


def _blend(rgb: np.ndarray, label: np.ndarray, colours: np.ndarray, ignore: int) -> np.ndarray:
    out = rgb.copy()
    draw = (label > 0) & (label != ignore)
    out[draw] = (0.45 * rgb[draw] + 0.55 * colours[np.clip(label[draw], 0, len(colours) - 1)]).astype(np.uint8)
    return out


def _frames(sample: dict) -> list[tuple[str, np.ndarray]]:
    frames = []
    for key, title in (("ir", "infrared"), ("vi", "visible")):
        if key in sample:
            value = sample[key]
            frames.append((title, displayable(np.asarray(value[0] if value.ndim == 4 else value))))
    return frames


def _title(img: np.ndarray, text: str) -> np.ndarray:
    img = img.copy()
    cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def _save(path: Path, rows: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))


def write_seg_overlay(path: Path, sample: dict, pred: np.ndarray, label: np.ndarray | None, ignore: int) -> None:
    """One row per modality: frame | ground truth (when there is one) | prediction."""
    top = int(pred.max()) if label is None else int(max(pred.max(), label[label != ignore].max(initial=0)))
    colours = palette(top + 1)
    rows = []
    for title, rgb in _frames(sample):
        panels = [_title(rgb, title)]
        if label is not None:
            panels.append(_title(_blend(rgb, label, colours, ignore), "ground truth"))
        panels.append(_title(_blend(rgb, pred, colours, ignore), "prediction"))
        rows.append(np.concatenate(panels, axis=1))
    _save(path, rows)


def write_det_overlay(path: Path, sample: dict, pred: dict, truth: dict | None, class_names: list[str],
                      score_threshold: float = 0.3) -> None:
    """One row per modality: ground-truth boxes (green; frame only without ground truth) | predicted
    boxes above the threshold (red)."""
    rows = []
    for title, rgb in _frames(sample):
        gt_img = _title(rgb, f"{title}: ground truth" if truth is not None else title)
        pr_img = _title(rgb, "prediction")
        for box, label in zip(*((truth["boxes"], truth["labels"]) if truth is not None else ((), ()))):
            _box(gt_img, box, class_names[int(label)], (0, 255, 0))
        for box, label, score in zip(pred["boxes"], pred["labels"], pred["scores"]):
            if score >= score_threshold:
                _box(pr_img, box, f"{class_names[int(label)]} {score:.2f}", (255, 64, 64))
        rows.append(np.concatenate([gt_img, pr_img], axis=1))
    _save(path, rows)


def _box(img: np.ndarray, box, text: str, colour) -> None:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    cv2.rectangle(img, (x1, y1), (x2, y2), colour, 1)
    cv2.putText(img, text, (x1, max(y1 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
