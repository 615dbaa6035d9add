"""Detection datasets: aligned infrared / visible frames with boxes from COCO JSON, YOLO txt
folders or VOC XML folders (which modality's labels to use is the choice of ``data.boxes.path``).

Rules, each counted and named in the data report: boxes extending outside the image are clipped
(``box_clipped``); boxes with no area after clipping are dropped (``box_empty``); boxes of a class
not in ``data.classes`` are dropped (``unknown_class``), after ``data.class_aliases`` renames the
labels a dataset spells several ways (DroneVehicle's ``feright car`` for freight car); boxes of
``data.ignore_classes``, COCO crowd boxes, VOC difficult objects and bbGt ignore boxes become ignore
regions (``ignore_region``: not trained on; at evaluation a detection on one counts neither as a hit
nor as a false positive, as in Caltech / KAIST pedestrian evaluation); label
files without an image are listed (``label_without_image``); frames without boxes stay as negatives.
Nothing fails mid-epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_tools.annotations import AnnotationSet, boxes_to_pixels, clip_boxes, read_annotations
from data_tools.transforms import IR_MEAN, IR_STD, IntensityConfig
from finetune.data.augment import crop, hflip, network_inputs, pad_inputs, photometric, rescale, whole_frame_intensity
from finetune.data.pairs import FRAME_DIR, UNKNOWN_BOXES, PairRecord, frame_dirs, issue
from finetune.data.seg import read_checked_pair, read_pair
from finetune.data.threads import map_in_threads
from pretrain.engine.streams import DataError

MIN_BOX_SIDE = 1.0  # pixels: boxes thinner than this after augmentation are dropped


@dataclass(frozen=True)
class DetDataSpec:
    classes: tuple[str, ...]
    input_size: tuple[int, int] = (1024, 1024)  # (height, width) of every network input
    scale_range: tuple[float, float] = (0.1, 2.0)  # large-scale jitter, relative to input_size
    hflip: float = 0.5
    photometric: bool = False
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    ir_mean: float = IR_MEAN
    ir_std: float = IR_STD


@dataclass
class DetRecord:
    pair: PairRecord
    boxes: np.ndarray  # (N, 4) x1 y1 x2 y2 in pixels of the original frame
    labels: np.ndarray  # (N,) class indices
    size: tuple[int, int]  # (height, width)
    ignore: np.ndarray  # (M, 4) xyxy ignore regions
    occlusion: np.ndarray  # (N,) occlusion level of each box (VOC <occlusion>), -1: not given


class ScoringLimits(NamedTuple):
    """Objects a detection split is scored on (``eval.min_height`` / ``max_occlusion`` / ``border``);
    the others are ignore regions at evaluation."""
    min_height: float = 0.0
    max_occlusion: int | None = None
    border: float = 0.0

    @classmethod
    def of(cls, cfg) -> "ScoringLimits":
        e = cfg.eval  # a run saved before these settings existed scores every object
        return cls(float(e.get("min_height") or 0), e.get("max_occlusion"), float(e.get("border") or 0))


def _class_index(label, classes: tuple[str, ...]) -> int | None:
    if isinstance(label, str):
        return classes.index(label) if label in classes else None
    return int(label) if 0 <= int(label) < len(classes) else None


def frame_boxes(boxes_cfg, id_names: tuple[str, ...], names: list[str], name_suffix: str = "",
                aliases: dict[str, str] | None = None) -> AnnotationSet:
    """The annotations of ``data.boxes`` by frame name: stems without ``name_suffix`` (annotations
    named as the infrared files); where the path holds ``{dir}``, the folder of each frame
    ``DIR/NAME`` of ``names``; else, for frames named by their folders, also a file named by the
    whole name with its folders joined by ``_`` (``set06_V000_I00019.txt`` is frame
    ``set06/V000/I00019``: KAIST's improved test annotations and Caltech's converted releases
    are one folder of such files). A label file that cannot be parsed is an issue of its frame
    (the file in the detail). ``id_names``: the names YOLO class ids index (``label_id_names``);
    ``aliases``: label as written -> class name (``data.class_aliases``)."""
    path, fmt = str(boxes_cfg.path), boxes_cfg.format
    if FRAME_DIR in path and fmt == "coco":
        raise ValueError(f"data.boxes.path {path}: {FRAME_DIR} names a folder per frame folder, for label files "
                         "(yolo, voc); a COCO file is one file")
    folders = [(f"{d}/", path.replace(FRAME_DIR, d)) for d in frame_dirs(names)] if FRAME_DIR in path else [("", path)]
    joined = {} if FRAME_DIR in path else {n.replace("/", "_"): n for n in names if "/" in n}

    def frame(prefix: str, stem: str) -> str:
        key = prefix + stem.removesuffix(name_suffix)
        return joined.get(key, key)

    out = AnnotationSet()
    for prefix, folder in folders:
        ann = read_annotations(fmt, folder, classes=id_names)
        out.boxes.update({frame(prefix, stem): [_renamed(r, aliases) for r in recs] if aliases else recs
                          for stem, recs in ann.boxes.items()})
        for i in ann.issues:
            if i["reason"] != "annotation_parse_error":
                i = dict(i, name=frame(prefix, i["name"]))
            elif fmt != "coco":  # named by its file: its frame's name, the file in the detail
                i = issue(frame(prefix, Path(i["name"]).stem), i["reason"], f"{i['name']}: {i['detail']}")
            out.issues.append(i)
    return out


def _renamed(record, aliases: dict[str, str]):
    """The record with its label as ``aliases`` renames it (names; a YOLO class id is no key)."""
    return replace(record, label=aliases[record.label]) if record.label in aliases else record


def _unreadable_coco(ann: AnnotationSet, boxes_cfg) -> str | None:
    if boxes_cfg.format == "coco" and ann.issues and ann.issues[0]["reason"] == "annotation_parse_error":
        return f"the COCO file {boxes_cfg.path} could not be read ({ann.issues[0]['detail']})"
    return None


def classes_problem(pairs: list[PairRecord], boxes_cfg, classes: tuple[str, ...], name_suffix: str = "",
                    scoring: ScoringLimits | None = None, id_names: tuple[str, ...] | None = None,
                    aliases: dict[str, str] | None = None) -> str | None:
    """From the annotation files (no pixel read): why the boxes of these frames cannot teach a
    detector of ``classes`` (none at all, or none of a configured class: trained on, every frame
    would be background), or, with ``scoring``, why none of them would be scored; or None."""
    names = {p.name for p in pairs}
    ann = frame_boxes(boxes_cfg, id_names or classes, sorted(names), name_suffix, aliases)
    if problem := _unreadable_coco(ann, boxes_cfg):
        return problem
    labels = [r.label for name, recs in ann.boxes.items() if name in names for r in recs]
    if not labels:
        unread = [i for i in ann.issues if i["reason"] == "annotation_parse_error"]
        why = f" ({len(unread)} label files could not be read, e.g. {unread[0]['detail']})" if unread else ""
        return f"the labels in {boxes_cfg.path} give no box to any of its {len(names)} frames{why}"
    if any(_class_index(label, classes) is not None for label in labels):
        if not scoring:
            return None
        objects = [(p, [r for r in ann.boxes.get(p.name, []) if _class_index(r.label, classes) is not None
                        and not r.ignore]) for p in pairs]
        return _unscored_problem([(p, recs) for p, recs in objects if recs], scoring)
    counts: dict = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    named = ", ".join(f"{'id ' if isinstance(k, int) else ''}{k!s} ({n})"
                      for k, n in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    return (f"none of its {len(labels)} boxes has a class of data.classes {list(classes)}: the labels name {named}; "
            "set data.classes to the names they use (YOLO: in the order of their ids)")


def _unscored_problem(objects: list[tuple[PairRecord, list]], limits: ScoringLimits) -> str | None:
    """Why none of ``objects`` (box records by frame) would be scored under ``eval.min_height`` /
    ``eval.max_occlusion`` / ``eval.border``, as evaluation scores them, or None. A frame's size
    is read (its header) only where the rule needs it: boxes in fractions of the frame (YOLO), or
    a border; a frame whose size cannot be read is not held against the split (training reports it)."""
    tallest = 0.0
    for pair, recs in objects:
        # pixel boxes without a border: the height and the occlusion level decide, whatever the size
        needs_size = limits.border or any(r.normalized for r in recs)
        if (size := _frame_size(pair) if needs_size else (np.inf, np.inf)) is None:
            return None
        boxes, keep, _ = _pixel_boxes(recs, size[1], size[0], pair.crop)
        occlusion = np.array([-1 if r.occlusion is None else r.occlusion for r in recs], np.int64)
        boxes, occlusion = boxes[keep], occlusion[keep]
        if scored_objects(boxes, occlusion, size, limits).any():
            return None
        tallest = max(tallest, float((boxes[:, 3] - boxes[:, 1]).max(initial=0)))
    if not objects:
        return None
    count = sum(len(recs) for _, recs in objects)
    limits_met = [f"under eval.min_height={limits.min_height:g} px tall (the tallest: {tallest:g} px)"] \
        if limits.min_height else []
    limits_met += [f"within eval.border={limits.border:g} px of the frame's edge"] if limits.border else []
    if limits.max_occlusion is not None:
        limits_met.append(f"occluded above eval.max_occlusion={limits.max_occlusion}")
    which = " or ".join([", ".join(limits_met[:-1])] + limits_met[-1:]) if len(limits_met) > 1 else limits_met[0]
    return (f"none of its {count} objects would be scored: every one is {which}; lower the limits (KAIST's "
            "reasonable setting at full size: 55, 5 and 1; every object: 0, 0 and null)")


def _frame_size(pair: PairRecord) -> tuple[int, int] | None:
    """(height, width) of a pair's frames after its crop, from the first file's header (PIL reads no
    pixels; frames are decoded without EXIF rotation, as this size is), else by decoding it; None if
    unreadable."""
    from PIL import Image

    path = next(p for p in (pair.ir, pair.vi, pair.packed) if p)
    top, bottom, left, right = pair.crop
    try:
        with Image.open(path) as image:
            return max(image.size[1] - top - bottom, 0), max(image.size[0] - left - right, 0)
    except (OSError, ValueError, SyntaxError):  # a format PIL does not know, a damaged header: decode
        size = _size_or_issue(pair)
        return None if isinstance(size, dict) else size


def _size_or_issue(pair: PairRecord) -> tuple[int, int] | dict:
    """(height, width) of a readable pair of one size, else the issue that leaves it out."""
    frames, problem = read_checked_pair(pair)
    return problem or next(f.shape[:2] for f in frames.values() if f is not None)


def crop_offset(crop: tuple[int, int, int, int]) -> np.ndarray:
    """What a (top, bottom, left, right) border crop adds to an xyxy box to give the file's pixels."""
    top, _, left, _ = crop
    return np.array([left, top, left, top], np.float32)


def whole_size(size: tuple[int, int], crop: tuple[int, int, int, int]) -> tuple[int, int]:
    """(height, width) of the file whose frame, after ``crop`` (top, bottom, left, right), is ``size``."""
    top, bottom, left, right = crop
    return size[0] + top + bottom, size[1] + left + right


def _pixel_boxes(recs, w: int, h: int, crop=(0, 0, 0, 0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xyxy pixel boxes of ``recs`` in the (w, h) frame left after ``crop`` (top, bottom, left, right;
    the files' boxes are in the whole frame's pixels), clipped to it, which of them have an area, which
    were clipped."""
    whole_h, whole_w = whole_size((h, w), crop)
    xywh = boxes_to_pixels(recs, whole_w, whole_h) - np.array([*crop_offset(crop)[:2], 0, 0], np.float64)
    xywh, keep, clipped = clip_boxes(xywh, w, h)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32).reshape(-1, 4)
    return xyxy, keep, clipped


def build_records(pairs: list[PairRecord], boxes_cfg, classes: tuple[str, ...],
                  in_split: list[str] | None = None, name_suffix: str = "",
                  ignore_classes: tuple[str, ...] = (),
                  id_names: tuple[str, ...] | None = None,
                  aliases: dict[str, str] | None = None) -> tuple[list[DetRecord], list[dict]]:
    """Read every frame once (size check) and attach its boxes under the documented rules.
    ``in_split``: the split's names (label files of other frames are not orphans);
    ``name_suffix``: removed from annotation stems (annotations named as the infrared files);
    ``ignore_classes``: labels whose boxes are ignore regions; ``id_names``: the names YOLO class ids
    index, where they are more than ``classes`` (a dataset's class file); ``aliases``: label as
    written -> class name."""
    ann = frame_boxes(boxes_cfg, id_names or classes, [p.name for p in pairs], name_suffix, aliases)
    if problem := _unreadable_coco(ann, boxes_cfg):
        raise DataError(f"{problem}; no frame would have its boxes")
    issues = list(ann.issues)
    # A frame whose boxes are unknown (its label file could not be parsed, or several images share
    # its name) is left out: trained as a frame without objects, its objects would be taught as background.
    unknown = {i["name"] for i in issues if i["reason"] in UNKNOWN_BOXES}
    names = {p.name for p in pairs}
    scope = set(ann.boxes) if in_split is None else set(ann.boxes) & set(in_split)
    issues += [issue(stem, "label_without_image") for stem in sorted(scope - names)]
    records = []
    pairs = [pair for pair in pairs if pair.name not in unknown]  # those named in the issues above
    for pair, checked in zip(pairs, map_in_threads(_size_or_issue, pairs)):
        if isinstance(checked, dict):
            issues.append(checked)
            continue
        h, w = checked
        objects, labels, regions, occlusion = [], [], [], []
        for r in ann.boxes.get(pair.name, []):
            if r.ignore or r.label in ignore_classes:
                regions.append(r)
                why = f" ({r.ignored_as})" if r.ignore else ""
                issues.append(issue(pair.name, "ignore_region", f"class {r.label!r}{why}"))
            elif (k := _class_index(r.label, classes)) is None:
                issues.append(issue(pair.name, "unknown_class", f"class {r.label!r}"))
            else:
                objects.append(r)
                labels.append(k)
                occlusion.append(-1 if r.occlusion is None else r.occlusion)
        xyxy, keep, clipped = _pixel_boxes(objects, w, h, pair.crop)
        issues += [issue(pair.name, "box_clipped", f"box {i}") for i in np.flatnonzero(clipped)]
        issues += [issue(pair.name, "box_empty", f"box {i}") for i in np.flatnonzero(~keep)]
        ignore, has_area, _ = _pixel_boxes(regions, w, h, pair.crop)  # a region outside the frame ignores nothing
        records.append(DetRecord(pair, xyxy[keep], np.array(labels, np.int64).reshape(-1)[keep], (h, w),
                                 ignore[has_area], np.array(occlusion, np.int64).reshape(-1)[keep]))
    return records, issues


def evaluation_truth(record: DetRecord, limits: ScoringLimits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, labels, ignore regions) a frame is scored against: objects shorter than
    ``min_height`` pixels, more occluded than ``max_occlusion`` or within ``border`` pixels of the
    frame's edge join the ignore regions (the "reasonable" setting of pedestrian benchmarks: KAIST
    55 px, at most partly occluded, 5 px). Training uses every object."""
    scored = scored_objects(record.boxes, record.occlusion, record.size, limits)
    return record.boxes[scored], record.labels[scored], np.concatenate([record.ignore, record.boxes[~scored]])


def scored_objects(boxes: np.ndarray, occlusion: np.ndarray, size: tuple[float, float],
                   limits: ScoringLimits) -> np.ndarray:
    """Which objects (xyxy pixel boxes clipped to the frame of ``size`` (height, width); occlusion
    levels, -1 where not given) a split is scored on under ``limits``."""
    b, (h, w), border = boxes, size, limits.border
    scored = (b[:, 3] - b[:, 1] >= limits.min_height) & (b[:, 0] >= border) & (b[:, 1] >= border)
    scored &= (b[:, 2] <= w - border) & (b[:, 3] <= h - border)
    if limits.max_occlusion is not None:
        scored &= occlusion <= limits.max_occlusion  # -1, not given, counts as visible
    return scored


def fit_to_input(frames: dict, input_size: tuple[int, int]) -> tuple[dict, float]:
    """The frames ({'ir', 'vi'}, either may be None) resized to fit ``input_size`` (height, width)
    with their aspect kept, and the scale that maps back; ``pad_inputs`` pads their network inputs
    at the bottom / right."""
    h, w = next(f.shape[:2] for f in frames.values() if f is not None)
    ih, iw = input_size
    ratio = min(ih / h, iw / w)
    return crop(rescale({"ir": frames["ir"], "vi": frames["vi"]}, ratio), 0, 0, ih, iw), ratio


class DetDataset:
    def __init__(self, records: list[DetRecord], spec: DetDataSpec):
        self.records, self.spec = records, spec

    def __len__(self) -> int:
        return len(self.records)

    def names(self) -> list[str]:
        return [record.pair.name for record in self.records]

    def _to_input(self, arrays: dict, name: str, boxes, labels, scale: float) -> dict:
        """Network inputs padded to the input size with the normalised mean (detectron2's ImageList, ViTDet)."""
        spec = self.spec
        inputs = network_inputs(arrays["ir"], arrays["vi"], spec.intensity, spec.ir_mean, spec.ir_std)
        return dict(pad_inputs(inputs, *spec.input_size), name=name, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, np.int64), scale=scale)

    def train_sample(self, index: int, rng: np.random.Generator) -> dict:
        """Large-scale jitter: resize so the frame's long side is input x U(scale_range), random
        crop, flip, pad to the input size; identical for both modalities and the boxes."""
        rec = self.records[index]
        frames = whole_frame_intensity(read_pair(rec.pair), self.spec.intensity)
        ih, iw = self.spec.input_size
        h, w = rec.size
        ratio = float(rng.uniform(*self.spec.scale_range)) * min(ih / h, iw / w)
        arrays = rescale({"ir": frames["ir"], "vi": frames["vi"], "boxes": rec.boxes.copy()}, ratio)
        sh, sw = (arrays["ir"] if arrays["ir"] is not None else arrays["vi"]).shape[:2]
        y = int(rng.integers(0, max(sh - ih, 0) + 1))
        x = int(rng.integers(0, max(sw - iw, 0) + 1))
        arrays = crop(arrays, y, x, ih, iw)
        ph, pw = (arrays["ir"] if arrays["ir"] is not None else arrays["vi"]).shape[:2]
        boxes = arrays["boxes"]  # clipped to the crop
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, pw)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, ph)
        if rng.uniform() < self.spec.hflip:
            arrays = hflip(arrays, pw)
        if arrays["vi"] is not None and self.spec.photometric:
            arrays["vi"] = photometric(arrays["vi"], rng)
        boxes = arrays["boxes"]
        keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)
        return self._to_input(arrays, rec.pair.name, boxes[keep], rec.labels[keep], ratio)

    def eval_sample(self, index: int) -> dict:
        """Resized to fit the input size (aspect kept) and padded at the bottom / right; boxes in
        the original frame's pixels, ``scale`` maps predictions back."""
        rec = self.records[index]
        arrays, ratio = fit_to_input(whole_frame_intensity(read_pair(rec.pair), self.spec.intensity),
                                     self.spec.input_size)
        return self._to_input(arrays, rec.pair.name, rec.boxes, rec.labels, ratio)

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        batch = {"targets": [{"boxes": torch.from_numpy(s["boxes"]), "labels": torch.from_numpy(s["labels"])}
                             for s in samples]}
        for m in ("ir", "vi"):
            if m in samples[0]:
                batch[m] = torch.from_numpy(np.stack([s[m] for s in samples]))
        return batch
