"""Annotation readers shared by the shard builder and fine-tuning: COCO JSON, YOLO txt folders,
VOC XML folders, bbGt txt folders (Piotr Dollar's toolbox: Caltech, KAIST) and binary/label
masks. Annotations match images by file stem; the annotations
of a stem that several images share are reported (``annotation_ambiguous``) and given to none.
Read ``nested`` (the shard builder), a folder tree of annotation files (``Annotations/seq/0001.xml``)
or COCO entries in folders keep their folders, and match the image of that stem whose path holds
them (``assign_to_images``): sequences that repeat frame names keep their boxes.

Boxes are (x, y, w, h) in pixels of the original image. Readers never raise on a bad file: they
record an issue (name + reason, ``data_tools.issues``) and go on, so one broken label file cannot stop a corpus build.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from data_tools.files import is_entry_to_read
from data_tools.issues import issue as data_issue
from data_tools.sources import IMAGE_EXTENSIONS
from data_tools.walk import walk_matching

ISSUE_REASONS = {
    "annotation_without_image": "an annotation names an image that the source does not contain",
    "annotation_parse_error": "an annotation file could not be parsed",
    "annotation_ambiguous": "annotations match images by file stem (and the folders around it), and several "
                            "images share this one; its annotations were not used",
    "box_clipped": "a box extending outside the image was clipped to it",
    "box_empty": "a box with zero area (after clipping) was dropped",
    "mask_size_mismatch": "a mask's size differs from its image's; its boxes were not used",
    "mask_unreadable": "a mask file could not be decoded",
}


# A normalised YOLO value above this is not a box a little past the frame's edge (clipped, as any)
# but pixel coordinates written where fractions belong: every box would cover the frame.
YOLO_MAX_NORMALISED = 1.5
# How a COCO annotation's label reads when the file's ``categories`` do not name its category_id.
UNNAMED_COCO_CATEGORY = "(not in the file's categories)"


@dataclass
class BoxRecord:
    box: tuple[float, float, float, float]  # x, y, w, h (normalised to [0, 1] if `normalized`)
    label: str | int
    normalized: bool = False
    ignore: bool = False  # a region that training and scoring ignore, not one object (ignored_as: why)
    ignored_as: str = ""  # crowd (COCO iscrowd), difficult (VOC <difficult>), ignore flag (bbGt)
    occlusion: int | None = None  # VOC <occlusion> (KAIST: 0 none, 1 partial, 2 heavy); None: not given


@dataclass
class AnnotationSet:
    """Boxes per image stem, mask files per stem, and the issues met while reading."""

    boxes: dict[str, list[BoxRecord]] = field(default_factory=dict)
    masks: dict[str, str] = field(default_factory=dict)
    issues: list[dict] = field(default_factory=list)

    def stems(self) -> set[str]:
        return set(self.boxes) | set(self.masks)

    def merge(self, other: "AnnotationSet") -> None:
        for stem, recs in other.boxes.items():
            self.boxes.setdefault(stem, []).extend(recs)
        self.masks.update(other.masks)
        self.issues.extend(other.issues)

    def drop_ambiguous(self, names: list[str], where: str) -> None:
        """Annotations match images by stem: where several of ``names`` (the images' stems, or
        rel paths) share an annotated stem, nobody can tell whose boxes they are. They are left
        out and reported, never given to every image of that stem."""
        count: dict[str, list[str]] = {}
        for name in names:
            count.setdefault(_stem(name), []).append(name)
        for stem in sorted(self.stems()):
            shared = count.get(stem, [])
            if len(shared) > 1:
                had = bool(self.boxes.pop(stem, None)) | (self.masks.pop(stem, None) is not None)
                if not had:  # an image entry without boxes loses nothing
                    continue
                shown = ", ".join(sorted(shared)[:3]) + (", ..." if len(shared) > 3 else "")
                self.issues.append(issue(stem, "annotation_ambiguous", f"{len(shared)} {where} share it: {shown}"))


def assign_to_images(anns: AnnotationSet, images: dict[str, str], where: str) -> tuple[dict[str, str], list[dict]]:
    """Which annotation key (``AnnotationSet`` boxes / masks) belongs to each image (``images``: an
    id -> the image's path), and the issues: keys no image matches, or that several match.

    A key ``STEM`` (flat folders) matches the images of that stem; a key ``DIR/SUB/STEM`` (a
    folder tree, read ``nested``) the image of that stem whose path holds ``DIR/SUB``, failing that
    ``SUB``, failing that any of that stem, as ``images/set00/V000/lwir/I00000.jpg`` holds
    ``annotations/set00/V000/I00000.xml``'s folders: the longest match wins. A flat key may also
    name the folders joined by ``_`` (``set06_V000_I00019``, as KAIST's improved test annotations
    and Caltech's converted releases do): it matches ``.../set06/V000/.../I00019.jpg``. Boxes that
    could be several images' are given to none."""
    index: dict[tuple, list[str]] = {}  # (folders, stem) -> keys, each key under every tail of its folders
    for key in sorted(anns.stems()):
        *folders, stem = key.split("/")
        for start in range(len(folders) + 1):
            index.setdefault((tuple(folders[start:]), stem), []).append(key)
        parts = stem.split("_") if not folders else []
        for k in range(1, len(parts)):  # all the joined folders, not their tails: set06_V000_I00019
            index.setdefault((tuple(parts[:k]), "_".join(parts[k:])), []).append(key)
    if not index:
        return {}, []
    lengths = sorted({len(f) for f, _ in index}, reverse=True)
    users: dict[str, list[str]] = {}
    issues = []
    for image, path in images.items():
        parts = path.replace("\\", "/").split("/")
        folders, stem = parts[:-1], Path(parts[-1]).stem
        for n in lengths:
            runs = {tuple(folders[i:i + n]) for i in range(len(folders) - n + 1)}  # n = 0: the stem alone
            found = sorted({k for run in runs for k in index.get((run, stem), ())})
            if found:
                break
        if len(found) == 1:
            users.setdefault(found[0], []).append(image)
        elif found:
            issues.append(issue(stem, "annotation_ambiguous", f"{image} matches {len(found)} annotations: "
                                                                 + ", ".join(found[:3])))
    assigned = {}
    for key in sorted(anns.stems()):
        shared = users.get(key, [])
        if len(shared) == 1:
            assigned[shared[0]] = key
        elif shared:
            shown = ", ".join(sorted(shared)[:3]) + (", ..." if len(shared) > 3 else "")
            issues.append(issue(key, "annotation_ambiguous", f"{len(shared)} {where} share it: {shown}"))
        else:
            where_found = "in the source" if "/" not in key else "in these folders of the source"
            issues.append(issue(key, "annotation_without_image", f"no image with this stem {where_found}"))
    return assigned, issues


def issue(file: str, reason: str, detail: str = "") -> dict:
    return data_issue(file, reason, detail, reasons=ISSUE_REASONS)


def _stem(name: str) -> str:
    """The stem of a file name, also when a Windows tool wrote its folders with backslashes."""
    return Path(name.replace("\\", "/")).stem


def _is_annotation_file(fmt: str, name: str, suffix: str) -> bool:
    """Whether a file in a folder of ``fmt`` annotations is one (masks: by ``suffix``, else an image)."""
    if fmt in ("yolo", "bbgt"):
        return name.endswith(".txt") and name != "classes.txt"
    if fmt == "voc":
        return name.endswith(".xml")
    return name.endswith(suffix) if suffix else name.lower().endswith(IMAGE_EXTENSIONS)


def read_coco(path: str, nested: bool = False) -> AnnotationSet:
    """COCO JSON boxes by image stem; a stem that several entries share is given to none, or
    (``nested``) keyed by each entry's folders and name (``seq1/000001``), for ``assign_to_images``."""
    out = AnnotationSet()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a BOM from Windows tools
        images = {img["id"]: img["file_name"] for img in data["images"]}
        cats = {c["id"]: c["name"] for c in data.get("categories", [])}
        repeated = _repeated_stems(images.values()) if nested else set()
        keys = {i: _key(f) if _stem(f) in repeated else _stem(f) for i, f in images.items()}
        for key in keys.values():
            out.boxes.setdefault(key, [])
        for ann in data.get("annotations", []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            # iscrowd, and the `ignore` flag of pedestrian sets converted to COCO (CityPersons, Caltech):
            # regions, as pycocotools and mmdetection's COCO reader take them
            crowd, flagged = bool(ann.get("iscrowd", 0)), bool(ann.get("ignore", 0))
            out.boxes[keys[ann["image_id"]]].append(
                BoxRecord((x, y, w, h), _coco_label(cats, ann["category_id"]), ignore=crowd or flagged,
                          ignored_as="crowd" if crowd else "ignore flag"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        out.issues.append(issue(path, "annotation_parse_error", f"{type(e).__name__}: {e}"))
        return out
    if not nested:  # sequences often repeat frame names (seq1/000001.jpg, seq2/000001.jpg): boxes would mix
        out.drop_ambiguous(list(images.values()), f"image entries of {path}")
    return out


def _coco_label(cats: dict, category_id) -> str:
    """The name of a COCO category; an id the file's ``categories`` do not name stays an unknown
    label that says so (a COCO id is not an index into ``data.classes``, as a YOLO id is)."""
    return cats[category_id] if category_id in cats else f"category_id {category_id} {UNNAMED_COCO_CATEGORY}"


def _key(name: str) -> str:
    """An annotation's key with its folders: ``seq1/000001`` for ``seq1\\000001.jpg`` or ``./seq1/000001.jpg``."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join([*parts[:-1], Path(parts[-1]).stem]) if parts else ""


def _repeated_stems(names) -> set[str]:
    return {stem for stem, n in Counter(map(_stem, names)).items() if n > 1}


def _annotation_files(fmt: str, folder: str, suffix: str = "", nested: bool = False) -> list[tuple[str, str]]:
    """(key, path) of the annotation files of ``folder``, sorted: keyed by stem (masks: the name
    less ``suffix``); ``nested``: also those of its subfolders, keyed ``SUB/DIRS/STEM``."""
    def stem(name: str) -> str:
        return name[: -len(suffix)] if fmt == "mask" and suffix else os.path.splitext(name)[0]

    if not nested:
        return [(stem(n), os.path.join(folder, n)) for n in sorted(os.listdir(folder))
                if _is_annotation_file(fmt, n, suffix) and is_entry_to_read(os.path.join(folder, n))]
    out = []  # linked sequence folders are read as the frames' are (walk_matching: each folder once)
    for rel in walk_matching(folder, ["**/*"]).files:
        here, name = os.path.split(rel)
        if _is_annotation_file(fmt, name, suffix) and is_entry_to_read(os.path.join(folder, rel)):
            out.append((f"{here}/{stem(name)}" if here else stem(name), os.path.join(folder, rel)))
    return out


def _yolo_box(parts: list[str], line_no: int) -> tuple[float, float, float, float]:
    """(x, y, w, h), normalised, of a YOLO line's fields after the class: ``cx cy w h``, or a
    polygon's ``x1 y1 x2 y2 ...`` (YOLO-seg, or YOLO-OBB's four corners), read as the box enclosing
    it, as Ultralytics trains a detector on such labels."""
    if len(parts) != 4 and (len(parts) < 6 or len(parts) % 2):
        raise ValueError(f"line {line_no}: expected class cx cy w h, or class and the x y pairs of a polygon; "
                         f"got {len(parts) + 1} fields")
    values = [float(v) for v in parts]
    if max(values) > YOLO_MAX_NORMALISED:
        raise ValueError(f"line {line_no}: YOLO boxes are normalised to the image size (0-1), got "
                         f"{' '.join(parts)}: pixel coordinates?")
    if len(values) == 4:
        cx, cy, w, h = values
        return cx - w / 2, cy - h / 2, w, h
    xs, ys = values[0::2], values[1::2]
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def _read_line_files(fmt: str, folder: str, nested: bool, parse, check=None) -> AnnotationSet:
    """Text label files, one per image and one box per line: ``parse(fields, line number)`` gives
    its BoxRecord, or None for a line that holds none (a header); ``check(lines)`` raises
    ValueError for a file that is not of the format. A file with a bad line is an issue."""
    out = AnnotationSet()
    for key, path in _annotation_files(fmt, folder, nested=nested):
        try:
            lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
            if check is not None:
                check(lines)
            out.boxes[key] = [r for n, line in enumerate(lines, 1) if line.strip()
                              and (r := parse(line.split(), n)) is not None]
        except (OSError, ValueError, UnicodeDecodeError) as e:
            out.issues.append(issue(path, "annotation_parse_error", str(e)))
    return out


def read_yolo(folder: str, classes: tuple[str, ...] = (), nested: bool = False) -> AnnotationSet:
    """YOLO txt: one file per image, lines ``class cx cy w h`` normalised to the image size (or a
    polygon: its enclosing box)."""
    def parse(parts: list[str], line_no: int) -> BoxRecord:
        if parts[0] == "%" and parts[1:2] == ["bbGt"]:
            raise ValueError(f"line {line_no} is the header of Dollar's toolbox format: set the format to bbgt")
        cls = int(float(parts[0]))
        if cls < 0:  # as an index into the class names it would name the last class
            raise ValueError(f"line {line_no}: class id {parts[0]} is negative; YOLO class ids count from 0")
        return BoxRecord(_yolo_box(parts[1:], line_no), classes[cls] if cls < len(classes) else cls, normalized=True)

    return _read_line_files("yolo", folder, nested, parse)


def _bbgt_record(parts: list[str], line_no: int) -> BoxRecord | None:
    if parts[0].startswith("%"):  # the "% bbGt version=3" header
        return None
    if len(parts) < 5:
        raise ValueError(f"line {line_no}: expected label x y w h [occluded vx vy vw vh ignore angle], "
                         f"got {len(parts)} fields")
    x, y, w, h = (float(v) for v in parts[1:5])
    occlusion = int(float(parts[5])) if len(parts) > 5 else None
    ignore = len(parts) > 10 and float(parts[10]) != 0
    return BoxRecord((x, y, w, h), parts[0], ignore=ignore, ignored_as="ignore flag", occlusion=occlusion)


def _bbgt_header(lines: list[str]) -> None:
    """A bbGt file opens with its ``% bbGt version=N`` header; without one the toolbox reads version
    0, ten fields a line. A file with neither (YOLO's ``class cx cy w h``, corner boxes) would give
    boxes of another meaning: refused."""
    first = next((line.split() for line in lines if line.strip()), None)
    if first is None or first[0].startswith("%"):
        return
    if len(first) < 10:
        numeric_label = re.fullmatch(r"[-+]?\d+(\.\d*)?", first[0]) is not None
        guess = ("YOLO's class cx cy w h? set the format to yolo" if numeric_label else
                 "a label and corners x1 y1 x2 y2, as some KAIST training lists are written? convert them; "
                 "if the numbers are x y w h in pixels, add the header line '% bbGt version=3' to each file")
        raise ValueError(f"no '% bbGt version=3' header and {len(first)} fields on line 1 (version 0, without "
                         f"a header, has 10: label x y w h occluded vx vy vw vh): not a bbGt file ({guess})")


def read_bbgt(folder: str, nested: bool = False) -> AnnotationSet:
    """Piotr Dollar's toolbox text format (Caltech, KAIST, CVC-14): one file per image, a
    ``% bbGt version=3`` header, then ``label x y w h occluded vx vy vw vh ignore angle`` in pixels;
    the occlusion level is kept (KAIST: 0 none, 1 partial, 2 heavy) and ``ignore`` makes the box an
    ignore region, as the toolbox's evaluation reads it."""
    return _read_line_files("bbgt", folder, nested, _bbgt_record, _bbgt_header)


def read_voc(folder: str, nested: bool = False) -> AnnotationSet:
    out = AnnotationSet()
    for key, path in _annotation_files("voc", folder, nested=nested):
        try:
            root = ET.parse(path).getroot()
            recs = [BoxRecord(_voc_object_box(obj, k), obj.findtext("name", "object"), occlusion=_voc_occlusion(obj, k),
                              ignore=_voc_difficult(obj, k), ignored_as="difficult")
                    for k, obj in enumerate(root.iter("object"), 1)]
        except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as e:
            out.issues.append(issue(path, "annotation_parse_error", f"{type(e).__name__}: {e}"))
            continue
        out.boxes[key] = recs
    return out


def _voc_difficult(obj: ET.Element, number: int) -> bool:
    """An ``<object>`` marked ``<difficult>1</difficult>``: PASCAL VOC's evaluation neither counts it
    as missed nor a detection of it as false, and mmdetection's VOC reader does not train on it; here
    it is an ignore region, as a COCO crowd box is."""
    text = (obj.findtext("difficult") or "0").strip().lower()
    if text not in ("0", "1", "true", "false", ""):
        raise ValueError(f"object {number} ({obj.findtext('name', '?')}): <difficult> {text!r} is not 0 or 1")
    return text in ("1", "true")


def _voc_occlusion(obj: ET.Element, number: int) -> int | None:
    """An ``<object>``'s ``<occlusion>`` level (KAIST's annotations), None where it has none."""
    text = obj.findtext("occlusion")
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        name = obj.findtext("name", "?")
        raise ValueError(f"object {number} ({name}): <occlusion> {text!r} is not an integer") from None


def _voc_object_box(obj: ET.Element, number: int) -> tuple[float, float, float, float]:
    """(x, y, w, h) of a VOC ``<object>``: its ``<bndbox>`` of corners, or of ``<x><y><w><h>``
    (KAIST's XML annotations), or the axis-aligned box enclosing its ``<polygon>`` of
    ``<x1><y1>...<xN><yN>`` corners (DroneVehicle's oriented boxes)."""
    box = obj.find("bndbox")
    if box is not None and box.find("xmin") is None and box.find("w") is not None:
        x, y, w, h = (float(box.find(k).text) for k in ("x", "y", "w", "h"))
        return x, y, w, h
    if box is not None:
        x1, y1, x2, y2 = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        return x1, y1, x2 - x1, y2 - y1
    polygon = obj.find("polygon")
    if polygon is not None:
        xs = [float(e.text) for e in polygon if e.tag.startswith("x")]
        ys = [float(e.text) for e in polygon if e.tag.startswith("y")]
        if len(xs) >= 3 and len(xs) == len(ys):
            return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
        raise ValueError(f"object {number} ({obj.findtext('name', '?')}): a <polygon> needs >= 3 <xN>/<yN> "
                         f"pairs, got {len(xs)} x and {len(ys)} y")
    raise ValueError(f"object {number} ({obj.findtext('name', '?')}): neither <bndbox> nor <polygon>, "
                     f"only {sorted({e.tag for e in obj})}")


def index_masks(folder: str, suffix: str, nested: bool = False) -> AnnotationSet:
    """Mask files by image stem: ``<stem><suffix>`` (suffix with its extension, e.g.
    ``_pixels0.png``), or with no suffix, a mask named as its image (``<stem>.png``)."""
    return AnnotationSet(masks=dict(_annotation_files("mask", folder, suffix, nested)))


# For a folder format, the files of the others and what to set instead.
OTHER_FORMATS = {"voc": (".txt", "yolo, or bbgt (files that start '% bbGt version=3')"),
                 "yolo": (".xml", "voc"), "bbgt": (".xml", "voc")}


def _check_folder(fmt: str, path: str, suffix: str, nested: bool) -> None:
    """Folder formats read the files directly in their folder (unless ``nested``): a file path, or
    a folder whose files all sit in subfolders (``labels/train/*.txt``), would otherwise give no
    boxes, silently."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{fmt} annotations are a folder of files, and {path} is not a folder")
    if nested:
        return
    with os.scandir(path) as entries:
        if any(_is_annotation_file(fmt, e.name, suffix) for e in entries if e.is_file()):
            return
    for folder, _, files in os.walk(path):
        nested = [f for f in files if _is_annotation_file(fmt, f, suffix)]
        if nested:
            raise FileNotFoundError(
                f"{path} holds no {fmt} annotation files itself, but {folder} does (e.g. {sorted(nested)[0]}): "
                "point the annotation path at the folder that holds the files")
    if fmt in OTHER_FORMATS:  # files of another folder format: the format set is not theirs
        with os.scandir(path) as entries:
            others = sorted(e.name for e in entries if e.is_file() and e.name.endswith(OTHER_FORMATS[fmt][0]))
        if others:
            raise FileNotFoundError(f"{path} holds no {fmt} annotation files but {len(others)} {OTHER_FORMATS[fmt][0]} "
                                    f"files (e.g. {others[0]}): set the format to {OTHER_FORMATS[fmt][1]}")


def check_annotation_path(fmt: str, path: str, suffix: str = "", nested: bool = False) -> None:
    """FileNotFoundError naming what is wrong with an annotation path, before anything reads it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"annotation path does not exist: {path}")
    if fmt in ("yolo", "voc", "bbgt", "mask"):
        _check_folder(fmt, path, suffix, nested)
    elif fmt == "coco" and os.path.isdir(path):
        raise FileNotFoundError(f"coco annotations are one JSON file, and {path} is a folder")


def read_annotations(fmt: str, path: str, suffix: str = "", classes: tuple[str, ...] = (),
                     nested: bool = False) -> AnnotationSet:
    """The annotations at ``path``; ``nested``: with the folders below it (``assign_to_images``)."""
    check_annotation_path(fmt, path, suffix, nested)
    if fmt == "coco":
        return read_coco(path, nested)
    if fmt == "yolo":
        return read_yolo(path, classes, nested)
    if fmt == "voc":
        return read_voc(path, nested)
    if fmt == "bbgt":
        return read_bbgt(path, nested)
    if fmt == "mask":
        return index_masks(path, suffix, nested)
    raise ValueError(f"unknown annotation format {fmt!r}")


def boxes_to_pixels(records: list[BoxRecord], width: int, height: int) -> np.ndarray:
    """(N, 4) float64 xywh in pixels."""
    out = np.zeros((len(records), 4), np.float64)
    for i, r in enumerate(records):
        x, y, w, h = r.box
        out[i] = (x * width, y * height, w * width, h * height) if r.normalized else (x, y, w, h)
    return out


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip xywh boxes to the image. Returns (clipped boxes, keep mask, was-clipped mask)."""
    x1 = np.clip(boxes[:, 0], 0, width)
    y1 = np.clip(boxes[:, 1], 0, height)
    x2 = np.clip(boxes[:, 0] + boxes[:, 2], 0, width)
    y2 = np.clip(boxes[:, 1] + boxes[:, 3], 0, height)
    clipped = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    keep = (clipped[:, 2] > 0) & (clipped[:, 3] > 0)
    changed = np.any(np.abs(clipped - boxes) > 0.01, axis=1)  # ignore sub-pixel rounding (YOLO decimals)
    return clipped, keep, changed & keep


def boxes_from_mask(mask: np.ndarray) -> np.ndarray:
    """Bounding boxes (xywh) of the 8-connected foreground components of a mask."""
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    return stats[1:, :4].astype(np.float64).reshape(-1, 4)
