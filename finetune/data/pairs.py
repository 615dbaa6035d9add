"""Finding infrared / visible / label files of a fine-tuning dataset, and the report of what was
left out and why.

Layouts:
- ``pairs``: folders with matching file stems (MSRS / FMB: ``ir/``, ``vi/``, ``labels/``; SIRST:
  ``images/`` + ``masks/<name>_pixels0.png``). Folder names come from config; ``ir`` or ``vi`` may
  be null for single-modality data; ``label_suffix`` is appended to the stem of label files, and
  ``name_suffixes`` to the stems of infrared / visible files (FLIR-aligned: ``FLIR_00002_PreviewData``
  and ``FLIR_00002_RGB`` in one folder are frame ``FLIR_00002``).
- ``mfnet``: one 4-channel PNG per frame (RGB + thermal) in ``images/``, labels in ``labels/``.
A split list (a text file of names, one per line) selects frames; without one every frame is used.
Folders may name each frame's own folder with ``{dir}``, filled from the split list's entries
(KAIST: ``images/{dir}/lwir`` and the entry ``set00/V000/I01216`` give
``images/set00/V000/lwir/I01216.jpg``); such frames are named by the whole entry.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data_tools.annotations import ISSUE_REASONS, UNNAMED_COCO_CATEGORY
from data_tools.files import atomic_write_text, is_entry_to_read, missing_folder
from data_tools.issues import count_by_reason
from data_tools.issues import issue as data_issue
from data_tools.schema import four_sides
from data_tools.sources import IMAGE_EXTENSIONS, nested_images_note

PAIR_ISSUES = {
    "missing_partner": "the infrared or the visible frame of a pair is missing",
    "missing_label": "an image has no label file",
    "label_without_image": "a label file has no image",
    "not_found": "a name in the split list has no files",
    "unreadable": "an image or label file could not be decoded (detail: the reason)",
    "size_mismatch": "the infrared and visible frames differ in size",
    "mask_size_mismatch": "the label map's size differs from the image's",
    "unknown_label_values": "the label map holds values that are neither a class index nor the ignore index",
    "wrong_channels": "a packed (MFNet-style) image does not have 4 channels",
    "too_small": "nothing of the frame is left after data.border_crop",
    "unknown_class": "a box's class is not among the configured classes; the box was dropped",
    "ignore_region": "a box of data.ignore_classes (or a COCO crowd box) is an ignore region: not trained on, and "
                     "a detection on it counts neither as a hit nor as a false positive",
    **{k: ISSUE_REASONS[k] for k in ("box_clipped", "box_empty")},
    "annotation_parse_error": "an annotation file could not be parsed; its frame was left out (its boxes are unknown)",
    "annotation_ambiguous": "several images share this name, so whose boxes they are is unknown; "
                            "the frame was left out",
}
UNKNOWN_BOXES = ("annotation_parse_error", "annotation_ambiguous")  # reasons that leave a detection frame out
FRAME_DIR = "{dir}"  # in a folder name: the folder part of each split-list entry


@dataclass(frozen=True)
class PairRecord:
    name: str
    ir: str | None = None
    vi: str | None = None
    label: str | None = None
    packed: str | None = None  # MFNet-style 4-channel file (RGB + thermal)
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # (top, bottom, left, right) pixels cut off (data.border_crop)


def issue(name: str, reason: str, detail: str = "") -> dict:
    return data_issue(name, reason, detail, reasons=PAIR_ISSUES)


def list_images(folder: Path, suffix: str = "") -> dict[str, str]:
    """stem (without ``suffix``) -> path for the image files of a folder (not a folder or FIFO so named)."""
    if not folder.is_dir():
        raise FileNotFoundError(missing_folder(folder))
    out = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem.endswith(suffix) and is_entry_to_read(p):
            out[p.stem[: len(p.stem) - len(suffix)] if suffix else p.stem] = str(p)
    return out


def read_split(root: Path, split: str | None, keep_dirs: bool = False) -> list[str] | None:
    """The frame names of a split list (``keep_dirs``: with the folder part of each entry)."""
    if not split:
        return None
    path = Path(split) if Path(split).is_absolute() else root / split
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        shown = f": {path.parent} holds {', '.join(others[:12])}" if others else ""
        raise FileNotFoundError(f"split list {path} not found{shown}")
    return [_frame_name(line, keep_dirs) for line in path.read_text(encoding="utf-8-sig").splitlines()
            if line.strip()]


def _frame_name(entry: str, keep_dirs: bool = False) -> str:
    """A split list's entry as a frame name: lists written by other tools often name the file
    (``images/00012.png``, ``00012.jpg``) rather than the frame (``00012``)."""
    name = entry.strip().replace("\\", "/")
    name = name.strip("/") if keep_dirs else name.rsplit("/", 1)[-1]
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in IMAGE_EXTENSIONS else name


def uses_frame_dirs(data) -> bool:
    """Whether the folders name each frame's own folder (``{dir}``, filled from the split list)."""
    return any(FRAME_DIR in str(v) for v in data.dirs.values() if v)


def frame_dirs(names: list[str]) -> list[str]:
    """The folder parts of frame names ``DIR/NAME`` (each once, sorted)."""
    return sorted({n.rpartition("/")[0] for n in names})


def list_frames(root: Path, folder: str, suffix: str = "", dirs: list[str] | None = None) -> dict[str, str]:
    """frame name -> path of the image files of ``root / folder``; where ``folder`` holds ``{dir}``,
    of each of ``dirs`` filled in, named ``DIR/STEM`` (a folder that is not there holds none)."""
    if FRAME_DIR not in folder:
        return list_images(root / folder, suffix)
    base = root / folder.split(FRAME_DIR)[0]
    if not base.is_dir():
        raise FileNotFoundError(missing_folder(base))
    out = {}
    for d in dirs or ():
        where = root / folder.replace(FRAME_DIR, d)
        if where.is_dir():
            out.update({f"{d}/{stem}": path for stem, path in list_images(where, suffix).items()})
    return out


def name_suffix(data, modality: str) -> str:
    """How the stems of ``modality``'s files end after the frame name (``data.name_suffixes``)."""
    return (data.get("name_suffixes") or {}).get(modality) or ""


def split_names(data, split: str | None) -> list[str] | None:
    """The frame names a split list selects (None: no list). Lists that name the infrared files
    (FLIR-aligned's ``FLIR_00002_PreviewData``) give frame names without the infrared suffix."""
    wanted = read_split(Path(data.root), split, keep_dirs=uses_frame_dirs(data))
    suffix = name_suffix(data, "ir")
    return [n.removesuffix(suffix) for n in wanted] if wanted is not None and suffix else wanted


def _check_modalities_apart(data, root: Path) -> None:
    """Infrared and visible files in one folder (FLIR-aligned) are told apart by their name
    suffixes; with equal suffixes every file would be paired with itself, each image fed as both."""
    dirs = data.dirs
    if (dirs.ir and dirs.vi and (root / dirs.ir).resolve() == (root / dirs.vi).resolve()
            and name_suffix(data, "ir") == name_suffix(data, "vi")):
        raise ValueError(f"the infrared and visible frames are both read from {root / dirs.ir}: set "
                         "data.name_suffixes to tell them apart (FLIR-aligned: {ir: _PreviewData, vi: _RGB}), "
                         "or name two folders")


def border_crop(data) -> tuple[int, int, int, int]:
    """``data.border_crop`` as (top, bottom, left, right): an int is every side, [v, h] two (detection only)."""
    value = data.get("border_crop") or 0
    return tuple(int(v) for v in four_sides(value if isinstance(value, int) else list(value)))


def discover(data, split: str | None, need_label: bool = True) -> tuple[list[PairRecord], list[dict], int]:
    """Records for the ``data`` config section (layout, root, dirs, label_suffix), the issues met
    (each names the frame and why it was left out) and the number of frames considered."""
    root = Path(data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {missing_folder(root)}")
    dirs = data.dirs
    issues: list[dict] = []
    wanted = split_names(data, split)
    if uses_frame_dirs(data) and wanted is None:
        raise ValueError(f"data.dirs name each frame's folder with {FRAME_DIR}, which the split list's entries fill "
                         "in (KAIST: set00/V000/I01216): set data.train_split / data.val_split")
    folders = frame_dirs(wanted) if uses_frame_dirs(data) else None

    def listing(folder: str, suffix: str = "") -> dict[str, str]:
        return list_frames(root, str(folder), suffix, folders)

    labels = listing(dirs.label, data.label_suffix or "") if dirs.label and need_label else {}
    if data.layout == "mfnet":
        images = {"packed": listing(dirs.image)}
    elif data.layout == "pairs":
        if not (dirs.ir or dirs.vi):
            raise ValueError("data.dirs: set at least one of ir / vi")
        _check_modalities_apart(data, root)
        images = {m: listing(getattr(dirs, m), name_suffix(data, m)) for m in ("ir", "vi") if getattr(dirs, m)}
    else:
        raise ValueError(f"data.layout must be 'pairs' or 'mfnet', got {data.layout!r}")
    listed = set().union(*[set(v) for v in images.values()])
    names = sorted(listed)
    if wanted is not None:  # sets built once: a split list names up to ~25k frames (KAIST)
        chosen = set(wanted)
        issues += [issue(n, "not_found") for n in wanted if n not in listed and n not in labels]
        names = [n for n in wanted if n in listed]
        label_orphans = [n for n in labels if n in chosen and n not in listed]
    else:
        label_orphans = [n for n in labels if n not in listed]
    issues += [issue(n, "label_without_image", labels[n]) for n in sorted(label_orphans)]
    records, crop = [], border_crop(data)
    for n in names:
        missing = [m for m, files in images.items() if n not in files]
        if missing:
            issues.append(issue(n, "missing_partner", f"no {'/'.join(missing)} frame"))
            continue
        if need_label and n not in labels:
            issues.append(issue(n, "missing_label"))
            continue
        files = {m: images[m][n] for m in images}
        records.append(PairRecord(n, label=labels.get(n), crop=crop, **files))
    return records, issues, len(names)


def describe_issues(issues: list[dict]) -> str:
    """'(reason n, ...); e.g. NAME: what the reason means (detail)' of frames' issues."""
    first = next((i for i in issues if i["reason"] != "label_without_image"), issues[0])
    counts = ", ".join(f"{reason} {n}" for reason, n in count_by_reason(issues).items())
    detail = f" ({first['detail']})" if first.get("detail") else ""
    meaning = PAIR_ISSUES[first["reason"]].split(" (detail")[0]  # the detail follows
    return f"({counts}); e.g. {first['name']}: {meaning}{detail}"


def no_frames_problem(data, split: str | None, records: list[PairRecord], issues: list[dict], found: int) -> str | None:
    """Why a split that :func:`discover` listed gives no frame to use, from the listing alone (no
    image is read), or None when some frame has all its files."""
    if records:
        return None
    kinds = ("image",) if data.layout == "mfnet" else ("ir", "vi")
    folders = [Path(data.root) / getattr(data.dirs, m) for m in kinds if getattr(data.dirs, m, None)]
    if found:
        return f"none of its {found} frames has all its files {describe_issues(issues)}{nested_images_note(folders)}"
    if split:
        return f"no frame named in the split list {split} has image files under {data.root}"
    return f"no image files in {' or '.join(map(str, folders))}{nested_images_note(folders)}"


def summarise_issues(split_name: str, found: int, used: int, issues: list[dict]) -> dict:
    """The data report of one split: counts, counts per reason, and every issue by name."""
    by_reason = count_by_reason(issues)
    return {"split": split_name, "found": found, "used": used, "left_out": found - used,
            "issues_by_reason": by_reason, "reasons": {r: PAIR_ISSUES[r] for r in by_reason}, "issues": issues}


def unknown_classes_note(issues: list[dict], classes) -> str | None:
    """Which labels the boxes dropped as ``unknown_class`` had, most boxes first: a class missing
    from data.classes (or a YOLO id past its end) is seen in the log, not only in the report."""
    counts = Counter(i["detail"] for i in issues if i["reason"] == "unknown_class")
    if not counts:
        return None
    shown = ", ".join(f"{label} x{n}" for label, n in counts.most_common(8)) + (", ..." if len(counts) > 8 else "")
    n = sum(counts.values())
    head = f"{n} box{'es' if n != 1 else ''} left out, their class is not in data.classes {list(classes)}: {shown}; "
    if any(UNNAMED_COCO_CATEGORY in d for d in counts):
        return head + "the COCO file's 'categories' must name every category_id its annotations use"
    if any(d.removeprefix("class ").isdigit() for d in counts):  # the detail is the label's repr: a YOLO id
        return head + ("YOLO class ids index data.classes from 0: give it a name for every id the labels use "
                       "(data.classes_file: the dataset's data.yaml or classes.txt)")
    return head + "add a class to data.classes to train on it, or to data.ignore_classes to score it as an ignore region"


def write_report(path: Path, split_name: str, found: int, used: int, issues: list[dict]) -> dict:
    """:func:`summarise_issues`, written to ``path``."""
    report = summarise_issues(split_name, found, used, issues)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1))
    return report
