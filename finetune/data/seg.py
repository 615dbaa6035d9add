"""Segmentation datasets: aligned infrared / visible frames and a label map per frame.

Every frame is read once when the dataset is built: pairs whose partner is missing, whose sizes
differ, whose label map does not match the image or holds unknown values are left out and named
in the data report (``data_report_<split>.json``), never silently dropped or misaligned.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data_tools.imageio import (SkipSample, crop_border, mask_foreground, read_frame, read_label_map, read_raw,
                                read_rgb)
from data_tools.transforms import IR_MEAN, IR_STD, IntensityConfig
from finetune.data.augment import (AugmentConfig, crop, crop_corner, hflip, network_inputs, pad_inputs, photometric,
                                    photometric_infrared, rescale, scale_factor, whole_frame_intensity)
from finetune.data.pairs import PairRecord, issue
from finetune.data.threads import map_in_threads


@dataclass(frozen=True)
class SegDataSpec:
    num_classes: int
    ignore_index: int = 255
    binary_labels: bool = False  # masks such as SIRST's 0/255: their foreground is class 1 (mask_foreground)
    crop_size: tuple[int, int] = (512, 512)  # (height, width)
    img_scale: tuple[int, int] | None = None  # (long, short) the frames are rescaled to fit, train and eval
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    ir_mean: float = IR_MEAN
    ir_std: float = IR_STD


def read_pair(record: PairRecord) -> dict:
    """{'ir': (H, W) uint8/16 or None, 'vi': (H, W, 3) uint8 RGB or None} of one record, its
    ``crop`` cut off."""
    frames = _read_whole_pair(record)
    if any(record.crop):
        frames = {m: None if f is None else np.ascontiguousarray(crop_border(f, record.crop))
                  for m, f in frames.items()}
    return frames


def _read_whole_pair(record: PairRecord) -> dict:
    if record.packed:
        image = read_raw(record.packed)
        if image.ndim != 3 or image.shape[2] != 4:
            raise ValueError(f"wrong_channels: {image.shape}")
        rgb = np.ascontiguousarray(image[:, :, 2::-1])
        if rgb.dtype == np.uint16:
            rgb = (rgb >> 8).astype(np.uint8)
        return {"ir": np.ascontiguousarray(image[:, :, 3]), "vi": rgb}
    return {"ir": read_frame(record.ir).image if record.ir else None,
            "vi": read_rgb(record.vi) if record.vi else None}


def read_checked_pair(record: PairRecord) -> tuple[dict | None, dict | None]:
    """(frames, None) for a readable pair of one size, else (None, the issue that leaves it out)."""
    try:
        frames = read_pair(record)
    except SkipSample as e:
        return None, issue(record.name, "unreadable", str(e))
    except ValueError as e:
        return None, issue(record.name, "wrong_channels", str(e))
    shapes = {m: f.shape[:2] for m, f in frames.items() if f is not None}
    if len(set(shapes.values())) > 1:
        return None, issue(record.name, "size_mismatch", str(shapes))
    if min(min(s) for s in shapes.values()) == 0:
        return None, issue(record.name, "too_small", f"data.border_crop (top, bottom, left, right) {list(record.crop)} "
                                                     "leaves no pixel")
    return frames, None


class SegDataset:
    def __init__(self, records: list[PairRecord], spec: SegDataSpec):
        self.records, self.spec = records, spec

    def __len__(self) -> int:
        return len(self.records)

    def names(self) -> list[str]:
        return [record.name for record in self.records]

    def _label(self, record: PairRecord) -> np.ndarray:
        label = read_label_map(record.label)
        if not self.spec.binary_labels:
            return label
        return mask_foreground(label, record.label).astype(np.int64)

    def load(self, index: int) -> dict:
        record = self.records[index]
        frames = whole_frame_intensity(read_pair(record), self.spec.intensity)
        return dict(frames, label=self._label(record), name=record.name)

    def check(self, index: int) -> dict | None:
        """None when the frame is usable, else the issue that leaves it out."""
        record = self.records[index]
        name = record.name
        frames, problem = read_checked_pair(record)
        if problem:
            return problem
        try:
            label = self._label(record)
        except SkipSample as e:
            return issue(name, "unreadable", f"label: {e}")
        sample = dict(frames, label=label)
        size = next(f.shape[:2] for f in frames.values() if f is not None)
        if sample["label"].shape != size:
            return issue(name, "mask_size_mismatch", f"label {sample['label'].shape} vs image {size}")
        values = np.unique(sample["label"])
        unknown = [int(v) for v in values if not (0 <= v < self.spec.num_classes or v == self.spec.ignore_index)]
        if unknown:
            return issue(name, "unknown_label_values", f"values {unknown[:10]} (classes 0..{self.spec.num_classes - 1}, "
                                                       f"ignore {self.spec.ignore_index})")
        return None

    def validated(self) -> tuple["SegDataset", list[dict]]:
        """The dataset of the usable frames (each read once, on the process's threads) and the
        issues of the others."""
        problems = map_in_threads(self.check, range(len(self.records)))
        keep = [record for record, problem in zip(self.records, problems) if problem is None]
        return SegDataset(keep, self.spec), [problem for problem in problems if problem is not None]

    def _to_arrays(self, sample: dict) -> dict:
        spec = self.spec
        return dict(network_inputs(sample["ir"], sample["vi"], spec.intensity, spec.ir_mean, spec.ir_std),
                    name=sample["name"], label=sample["label"].astype(np.int64))

    def train_sample(self, index: int, rng: np.random.Generator) -> dict:
        """mmsegmentation's order: random rescale, crop, flip, photometric on visible (and on infrared
        with ``photometric_ir``), normalise, pad to the crop size (images with the normalised mean,
        the label with the ignore index)."""
        s = self.load(index)
        aug, (ch, cw) = self.spec.augment, self.spec.crop_size
        arrays = {"ir": s["ir"], "vi": s["vi"], "label": s["label"]}
        ratio = float(rng.uniform(*aug.ratio_range))
        arrays = rescale(arrays, scale_factor(*s["label"].shape, ratio, self.spec.img_scale))
        y, x = crop_corner(arrays["label"], (ch, cw), rng, aug.cat_max_ratio, self.spec.ignore_index)
        arrays = crop(arrays, y, x, ch, cw)
        if rng.uniform() < aug.hflip:
            arrays = hflip(arrays, arrays["label"].shape[1])
        if arrays["vi"] is not None and aug.photometric:
            arrays["vi"] = photometric(arrays["vi"], rng)
        if arrays["ir"] is not None and aug.photometric_ir:
            arrays["ir"] = photometric_infrared(arrays["ir"], rng)
        return pad_inputs(self._to_arrays(dict(arrays, name=s["name"])), ch, cw, self.spec.ignore_index)

    def eval_sample(self, index: int) -> dict:
        return self._to_arrays(self.load(index))

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        batch = {"label": torch.from_numpy(np.stack([s["label"] for s in samples]))}
        for m in ("ir", "vi"):
            if m in samples[0]:
                batch[m] = torch.from_numpy(np.stack([s[m] for s in samples]))
        return batch
