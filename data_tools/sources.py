"""Corpus sources and their frame rules (PAD's MSIP corpus, arXiv 2312.08192).

A source is a root folder, glob patterns, a frame stride, a sort order, an optional border crop,
an optional black-frame threshold and optional annotations. The stride applies per folder, so
a video sequence stored as one folder of frames keeps every n-th frame of each sequence, and a
flat folder keeps every n-th image. Frames sort naturally (``frame2`` before ``frame10``).
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from data_tools.config import schema_problems, yaml_problem
from data_tools.files import file_not_folder, folder_hint, folder_kind, folders_below, is_entry_to_read
from data_tools.schema import DEFAULT_GLOBS, SourceBoxesSchema, SourceMasksSchema, SourceSchema, number_as_text
from data_tools.walk import walk_matching

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".ppm", ".pnm")

# Recordings the builder does not decode (it reads frames): counted and named, never silently passed
# over. FLIR's radiometric .seq / .csq / .ats need the camera vendor's tools to become frames.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".ts",
                    ".seq", ".csq", ".ats")


class SourceError(ValueError):
    """A source description that cannot be used (missing root, no files, bad option)."""


@dataclass(frozen=True)
class AnnotationSpec:
    format: str  # coco | yolo | voc | mask
    path: str  # COCO: a JSON file; others: a folder
    suffix: str = ""  # mask files are <stem><suffix>, e.g. "_pixels0.png"
    classes: tuple[str, ...] = ()  # YOLO class names (index order), optional
    # labels whose boxes are ignore regions (KAIST's `people` and `person?`), as COCO crowd boxes are:
    # not objects that proposals-eval counts or proposals-fit learns from; they still join the proposals
    ignore_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    name: str
    root: str
    globs: tuple[str, ...] = DEFAULT_GLOBS
    stride: int = 1
    sort: str = "natural"  # natural | lexical
    border_crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, bottom, left, right
    black_threshold: float | None = None  # drop frames whose max <= this
    annotations: tuple[AnnotationSpec, ...] = ()
    expected_frames: int | None = None  # a recipe's published count: the build warns when it differs
    channel: int | None = None  # the stored channel that is the infrared frame (MFNet's 4-channel PNGs: 3)

    def describe(self) -> dict[str, Any]:
        """What shapes the output bytes (the expected count does not)."""
        d = asdict(self)
        d.pop("expected_frames")
        if d["channel"] is None:  # unset: the identity of builds made before the option existed
            d.pop("channel")
        for spec in d["annotations"]:  # the same, and it changes no stored byte
            spec.pop("ignore_classes")
        return d


@dataclass(frozen=True)
class Item:
    """One selected frame of a source, in corpus order."""

    source: str
    path: str  # absolute
    rel: str  # relative to the source root, POSIX separators
    sequence: str  # folder of the frame, relative to the root ("." for the root)
    frame: int  # position of the frame in its folder's sorted listing (before the stride)


@dataclass
class Discovery:
    items: list[Item] = field(default_factory=list)
    matched: int = 0  # files matching the globs (outside visible halves), before the stride
    all_rel: list[str] = field(default_factory=list)  # every matched file (annotations match these)
    videos: list[str] = field(default_factory=list)  # matched recordings, not read (VIDEO_EXTENSIONS)
    held_earlier: dict[str, int] = field(default_factory=dict)  # frames an earlier source holds, by source
    links_not_followed: list[str] = field(default_factory=list)  # linked folders already read (loops, aliases)
    unreadable_folders: list[str] = field(default_factory=list)  # folders that could not be listed
    other_modalities_left_out: dict[str, int] = field(default_factory=dict)  # visible, depth: folder -> frames
    infrared_twins: list[tuple[str, str, int]] = field(default_factory=list)  # folders, frame names in both


# Folder names of the modalities of a multi-modal dataset as it ships (MSRS ir / vi, M3FD Ir / Vis, LLVIP
# and LasHeR infrared / visible, KAIST lwir / visible, FLIR thermal_8_bit / RGB, PST900 thermal / rgb /
# depth, RoadScene cropinfrared / crop_HR_visible): whole words, or the long words anywhere in the name
# (DroneVehicle's trainimg / trainimgr: by the pair, _sibling_modalities).
MODALITY_WORDS = {
    "infrared": (frozenset({"ir", "lwir", "mwir", "tir", "thermal", "infrared"}), ("infrared", "thermal")),
    "visible": (frozenset({"vi", "vis", "visible", "rgb", "color", "colour", "optical", "visual"}), ("visible",)),
    "depth": (frozenset({"depth", "disparity"}), ("depth",)),
}


def folder_modality(name: str) -> str | None:
    """The modality a folder is named for ('infrared', 'visible', 'depth'), or None (several or none)."""
    low = name.lower()
    words = set(re.findall(r"[a-z]+", low))
    named = [m for m, (whole, anywhere) in MODALITY_WORDS.items() if words & whole or any(w in low for w in anywhere)]
    return named[0] if len(named) == 1 else None


def _folder_and_above(folder: str) -> list[str]:
    """``a/b`` -> ``['a', 'a/b']``: a folder (relative to a root) and those holding it, outermost first."""
    parts = folder.split("/") if folder else []
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _files_by_folder(files) -> dict[str, list[str]]:
    """Paths relative to a root, by their folder ('' for the root itself)."""
    by_folder: dict[str, list[str]] = {}
    for rel in files:
        by_folder.setdefault(rel.rpartition("/")[0], []).append(rel)
    return by_folder


def _by_parent(folders) -> dict[str, list[str]]:
    """Folder paths by the folder holding them: {parent: [names]}."""
    out: dict[str, list[str]] = {}
    for folder in folders:
        parent, _, name = folder.rpartition("/")
        out.setdefault(parent, []).append(name)
    return out


def _sibling_modalities(names: list[str]) -> dict[str, str | None]:
    """The modality each of these sibling folders is named for (:func:`folder_modality`). A pair named
    ``<x>img`` / ``<x>imgr`` is visible / infrared: DroneVehicle ships each split as ``trainimg/`` (RGB)
    beside ``trainimgr/`` (infrared), which no word names; alone, ``trainimg`` says nothing."""
    kinds = {name: folder_modality(name) for name in names}
    by_lower = {name.lower(): name for name in names}
    for name in names:
        if name.lower().endswith("img") and (infrared := by_lower.get(name.lower() + "r")):
            kinds[name], kinds[infrared] = "visible", "infrared"
    return kinds


def other_modality_folders(folders) -> set[str]:
    """Among ``folders`` (those holding frames, relative to a source's root) and the folders above them,
    those named for another modality (visible, depth) beside a sibling named for infrared: the other
    halves of a multi-modal dataset, whose frames are not infrared frames. A root is no sibling of
    anything: a source rooted at a visible folder reads it."""
    every = {above for folder in folders for above in _folder_and_above(folder)}
    halves = set()
    for parent, names in _by_parent(every).items():
        kinds = _sibling_modalities(names)
        if "infrared" in kinds.values():
            halves.update(f"{parent}/{n}" if parent else n for n, kind in kinds.items()
                          if kind not in (None, "infrared"))
    return halves


def _outside_other_modalities(files: set[str]) -> tuple[set[str], dict[str, int]]:
    """``files`` without those under another modality's folder (:func:`other_modality_folders`), and how
    many each held."""
    by_folder = _files_by_folder(files)
    halves = other_modality_folders(by_folder)
    if not halves:
        return files, {}
    left: dict[str, int] = {}
    kept = set()
    for folder, rels in by_folder.items():
        half = next((above for above in _folder_and_above(folder) if above in halves), None)
        if half is None:
            kept.update(rels)
        else:
            left[half] = left.get(half, 0) + len(rels)
    return kept, dict(sorted(left.items()))


def infrared_twins(by_folder: dict[str, list[str]]) -> list[tuple[str, str, int]]:
    """Sibling folders both named for infrared whose frames mostly share names (at least half of the
    smaller folder's), with the count shared: the same frames stored twice, as FLIR ADAS ships each
    frame in ``thermal_8_bit/`` (JPEG) and ``thermal_16_bit/`` (TIFF). Sequences named alike
    (KAIST's ``V000`` / ``V001``, each from ``I00000``) are not named for infrared and not compared.
    ``by_folder``: the frames by folder (:func:`_files_by_folder`)."""
    stems = {folder: {os.path.splitext(rel.rpartition("/")[2])[0] for rel in rels}
             for folder, rels in by_folder.items()
             if folder and folder_modality(folder.rpartition("/")[2]) == "infrared"}
    twins = []
    for parent, names in sorted(_by_parent(stems).items()):
        siblings = sorted(f"{parent}/{n}" if parent else n for n in names)
        for i, a in enumerate(siblings):
            for b in siblings[i + 1:]:
                shared = len(stems[a] & stems[b])
                if shared and 2 * shared >= min(len(stems[a]), len(stems[b])):
                    twins.append((a, b, shared))
    return twins


def left_out_text(left_out: dict[str, int]) -> str:
    """``{'vi': 20}`` -> ``20 frame(s) under vi/`` (the first three folders named)."""
    folders = ", ".join(f"{folder}/" for folder in list(left_out)[:3]) + (", ..." if len(left_out) > 3 else "")
    return f"{sum(left_out.values()):,} frame(s) under {folders}"


def natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _resolve(base_dir: Path, value) -> Path:
    """A path of the sources file: ``~/`` is the home folder, a relative one is under ``base_dir``."""
    return (base_dir / os.path.expanduser(str(value))).resolve()


def _annotation(spec: SourceBoxesSchema | SourceMasksSchema, base_dir: Path) -> AnnotationSpec:
    boxes = isinstance(spec, SourceBoxesSchema)
    return AnnotationSpec(spec.format if boxes else "mask", str(_resolve(base_dir, spec.path)), spec.suffix,
                          tuple(spec.classes), tuple(spec.ignore_classes) if boxes else ())


def source_from_dict(d: Any, base_dir: Path, number: int = 1) -> Source:
    """One entry of a sources file (the ``number``-th) as a ``Source``, its paths under ``base_dir``;
    an entry that does not fit ``SourceSchema`` is refused naming the source and each key at fault."""
    try:
        entry = SourceSchema.model_validate(d)
    except ValidationError as e:
        name = number_as_text(d.get("name")) if isinstance(d, dict) else None  # as the schema reads it
        which = f"source {name!r}" if isinstance(name, str) and name else f"source #{number}"
        raise SourceError(f"{which}: " + "\n  ".join(schema_problems(e, SourceSchema))) from None
    anns = tuple(_annotation(spec, base_dir) for spec in (entry.boxes, entry.masks) if spec is not None)
    return Source(entry.name, str(_resolve(base_dir, entry.root)), tuple(entry.globs), entry.stride, entry.sort,
                  entry.border_crop, entry.black_threshold, anns, entry.expected_frames, entry.channel)


def load_sources(path: str | Path, root: str | Path | None = None) -> list[Source]:
    """Read a sources YAML: ``sources: [{name, root, glob, stride, ...}, ...]``.

    Relative paths are taken relative to ``root`` if given (a recipe such as
    ``configs/data/msip.yaml`` and the folder the datasets were unpacked in), else to the YAML
    file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"sources file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SourceError(yaml_problem(path, e)) from None
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not a sources YAML (not text: an image or an archive?)") from None
    entries = data.get("sources") if isinstance(data, dict) else None
    if not entries:
        raise SourceError(f"{path}: expected a top-level 'sources:' list")
    if root is not None and not Path(root).is_dir():
        raise SourceError(f"sources root {root} is not a folder")
    base = Path(root).expanduser().resolve() if root is not None else path.parent.resolve()
    sources = [source_from_dict(e, base, number) for number, e in enumerate(entries, 1)]
    names = [s.name for s in sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SourceError(f"{path}: duplicate source names {sorted(dup)}")
    return sources


def source_from_shortcut(text: str) -> Source:
    """``NAME=PATH``: every image under PATH, recursively, with default rules."""
    if "=" not in text:
        raise SourceError(f"--source expects NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    return source_from_dict({"name": name, "root": path}, Path.cwd())


def _found_below(missing: Path, ancestors: int = 3) -> str:
    """Where ``missing`` is, one or two folders below one of its nearest existing ancestors, as a
    download that unpacked into a folder of its own puts it (``LLVIP-main/infrared/train``): said,
    or ''."""
    parent, looked = missing.parent, 0
    while parent != parent.parent and looked < ancestors:
        if parent.is_dir():
            looked += 1
            relative = missing.relative_to(parent)
            found = next(folders_below(parent, [str(relative)]), None)
            if found is not None:
                return f"; it is at {found / relative}: adjust the root (or --sources-root)"
        parent = parent.parent
    return ""


def _root_problem(root: Path) -> str | None:
    if root.is_dir():
        return None
    return file_not_folder(root) or f"folder does not exist: {root}{_found_below(root) or folder_hint(root)}"


def check_roots(sources: list[Source]) -> None:
    """Every source's root is a folder; else one error naming each that is not (a corpus of eight
    downloads with two still missing is told so at once, not one download per run) and the
    sources that are there, to build from with ``build --only``."""
    missing = [(s.name, problem) for s in sources if (problem := _root_problem(Path(s.root)))]
    if not missing:
        return
    if len(sources) == 1:
        raise SourceError(f"source '{missing[0][0]}': root {missing[0][1]}")
    there = [s.name for s in sources if s.name not in dict(missing)]
    lines = "".join(f"\n  source '{name}': root {problem}" for name, problem in missing)
    those = "the other source is" if len(there) == 1 else f"the other {len(there)} sources are"
    rest = (f"\n{those} there: build from them alone with --only {','.join(there)} (or leave the others out of "
            "the sources file)") if there else ""
    raise SourceError(f"{len(missing)} of {len(sources)} sources cannot be read:{lines}{rest}")


def select_sources(sources: list[Source], names: list[str]) -> list[Source]:
    """The sources named (``build --only``), in the sources file's order; an unknown name is refused."""
    known = [s.name for s in sources]
    if unknown := [n for n in names if n not in known]:
        raise SourceError(f"--only names {', '.join(unknown)}, which the sources do not: {', '.join(known)}")
    return [s for s in sources if s.name in names]


def discover(source: Source, skip: tuple[str, ...] = ()) -> Discovery:
    """The frames of ``source`` (stride applied), outside the folders ``skip`` and the other modalities'
    folders of a multi-modal dataset (:func:`other_modality_folders`, counted in ``other_modalities_left_out``)."""
    root = Path(source.root)
    if problem := _root_problem(root):
        raise SourceError(f"source '{source.name}': root {problem}")
    files: set[str] = set()
    videos: set[str] = set()
    walk = walk_matching(str(root), source.globs, skip)
    for rel in walk.files:
        name = rel.lower()
        kind = files if name.endswith(IMAGE_EXTENSIONS) else videos if name.endswith(VIDEO_EXTENSIONS) else None
        if kind is not None and is_entry_to_read(root / rel):  # one stat, only for the files it keeps
            kind.add(rel)
    files, other_modalities_left_out = _outside_other_modalities(files)
    if not files:
        if videos:
            first = min(videos)
            folder = f"frames/{Path(first).stem}"
            raise SourceError(
                f"source '{source.name}': no image files under {root}, but {len(videos)} video file(s) "
                f"(e.g. {first}); the builder reads frames, not recordings: extract each recording into a "
                f"folder of its own first, e.g. mkdir -p {folder} && ffmpeg -i {shlex.quote(str(root / first))} "
                f"{folder}/%06d.png (FLIR .seq / .csq: the camera vendor's tools), and point the source at "
                "those folders (`stride` then keeps every n-th frame of each)")
        built = (": it is a shard folder (data_tools build), which pre-training reads as it is: "
                 f"data.shards=[{{path: {root}}}]" if folder_kind(root) == "shards" else "")
        raise SourceError(f"source '{source.name}': no image files match {list(source.globs)} "
                          f"under {root}{built}")
    key = natural_key if source.sort == "natural" else (lambda s: s)
    by_folder = _files_by_folder(files)
    out = Discovery(matched=len(files), all_rel=sorted(files), videos=sorted(videos),
                    links_not_followed=walk.links_not_followed, unreadable_folders=walk.unreadable_folders,
                    other_modalities_left_out=other_modalities_left_out, infrared_twins=infrared_twins(by_folder))
    # a folder's frames are one sequence, named by the folder ('.' for the root's own frames)
    for sequence, folder in sorted(((folder or ".", folder) for folder in by_folder), key=lambda s: key(s[0])):
        frames = sorted(by_folder[folder], key=lambda r: key(r.rpartition("/")[2]))
        for index in range(0, len(frames), source.stride):
            rel = frames[index]
            out.items.append(Item(source.name, str(root / rel), rel, sequence, index))
    return out


def nested_images_note(folders) -> str:
    """'; F holds N image files: ...' for the first subfolder F of ``folders`` that holds images:
    frames are read from a folder itself, so images a level down (``ir/seq1/*.png``) are not seen."""
    for folder in folders:
        for sub, _, files in os.walk(folder):
            count = sum(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files)
            if count and Path(sub) != Path(folder):
                return f"; {sub} holds {count} image files: frames are read from the folder named, not its subfolders"
    return ""
