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

from data_tools.config import yaml_problem
from data_tools.files import file_not_folder, folder_kind, folders_below
from data_tools.walk import split_pattern, walk_matching

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".ppm", ".pnm")
BOX_FORMATS = ("coco", "yolo", "voc", "bbgt")  # what a source's (or a fine-tuning split's) boxes may be

# Recordings the builder does not decode (it reads frames): counted and named, never silently passed
# over. FLIR's radiometric .seq / .csq / .ats need the camera vendor's tools to become frames.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".ts",
                    ".seq", ".csq", ".ats")
DEFAULT_GLOBS = ("**/*",)  # every file with an image extension, recursively
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


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
    matched: int = 0  # files matching the globs, before the stride
    all_rel: list[str] = field(default_factory=list)  # every matched file (annotations match these)
    videos: list[str] = field(default_factory=list)  # matched recordings, not read (VIDEO_EXTENSIONS)
    held_earlier: dict[str, int] = field(default_factory=dict)  # frames an earlier source holds, by source
    links_not_followed: list[str] = field(default_factory=list)  # linked folders already read (loops, aliases)
    unreadable_folders: list[str] = field(default_factory=list)  # folders that could not be listed


def natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's `true` is not a count


def _integer(d: dict, key: str, name: str, default: int | None, minimum: int, what: str = "") -> int | None:
    """``d[key]`` as a whole number >= ``minimum``: a fraction, a word, a list or a boolean is refused
    (``stride: 2.7`` would otherwise keep every 2nd frame, ``stride: true`` every one)."""
    if key not in d:
        return default
    value = d.pop(key)
    if value is None and default is None:
        return None
    if not _is_int(value) or value < minimum:
        raise SourceError(f"source '{name}': {key} must be a whole number >= {minimum}{what}, got {value!r}")
    return value


def _names(value: Any, name: str, key: str) -> tuple[str, ...]:
    """A list of labels (a single word is refused: ``classes: person`` would read as six letters)."""
    value = value or ()
    if isinstance(value, (str, int, dict)) or not all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                                       for c in value):
        raise SourceError(f"source '{name}': {key} must be a list of labels, got {value!r} (write [person, car])")
    return tuple(str(c) for c in value)


def _border(value: Any, name: str) -> tuple[int, int, int, int]:
    if value is None:
        return (0, 0, 0, 0)
    if _is_int(value):
        values = [value] * 4
    else:
        values = list(value) if isinstance(value, (list, tuple)) else []
        if len(values) == 2:  # (vertical, horizontal)
            values = [values[0], values[0], values[1], values[1]]
    if len(values) != 4 or any(not _is_int(v) or v < 0 for v in values):
        raise SourceError(f"source '{name}': border_crop must be an int >= 0, [v, h] or "
                          f"[top, bottom, left, right], got {value!r}")
    return tuple(values)  # type: ignore[return-value]


def _resolve(base_dir: Path, value) -> Path:
    """A path of the sources file: ``~/`` is the home folder, a relative one is under ``base_dir``."""
    return (base_dir / os.path.expanduser(str(value))).resolve()


def source_from_dict(d: dict[str, Any], base_dir: Path) -> Source:
    d = dict(d)
    name = str(d.pop("name", ""))
    if not _NAME_RE.match(name):
        raise SourceError(f"source name {name!r} must be letters, digits, '_' or '-'")
    if "root" not in d:
        raise SourceError(f"source '{name}': 'root' is required")
    root = _resolve(base_dir, d.pop("root"))
    globs = d.pop("glob", d.pop("globs", DEFAULT_GLOBS))
    globs = tuple(globs) if isinstance(globs, (list, tuple)) else (globs,)
    for pattern in globs:
        if (not isinstance(pattern, str) or not pattern.strip() or os.path.isabs(pattern)
                or ".." in split_pattern(pattern)):
            raise SourceError(f"source '{name}': glob {pattern!r} must be a pattern below the root (`*.png`, "
                              "`**/lwir/*.jpg`); for frames elsewhere, move the root or add a source")
    stride = _integer(d, "stride", name, 1, minimum=1)
    sort = str(d.pop("sort", "natural"))
    if sort not in ("natural", "lexical"):
        raise SourceError(f"source '{name}': sort must be 'natural' or 'lexical'")
    border = _border(d.pop("border_crop", None), name)
    black = d.pop("black_threshold", None)
    if black is not None and (not isinstance(black, (int, float)) or isinstance(black, bool)):
        raise SourceError(f"source '{name}': black_threshold must be a number (the largest value of a frame "
                          f"dropped as black), got {black!r}")
    expected = _integer(d, "expected_frames", name, None, minimum=1)
    channel = _integer(d, "channel", name, None, minimum=0, what=" (0-based, in stored order B, G, R, A)")
    anns = []
    for key in ("boxes", "masks"):
        spec = d.pop(key, None)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise SourceError(f"source '{name}': {key} must be a mapping of its options ({key}: {{format: ..., "
                              f"path: ...}}), got {spec!r}")
        spec = dict(spec)
        fmt = "mask" if key == "masks" else str(spec.pop("format", ""))
        if fmt not in (*BOX_FORMATS, "mask"):
            raise SourceError(f"source '{name}': boxes.format must be one of {', '.join(BOX_FORMATS)}")
        if "path" not in spec:
            raise SourceError(f"source '{name}': {key}.path is required (the folder or file of the {key})")
        path = _resolve(base_dir, spec.pop("path"))
        ignore = spec.pop("ignore_classes", ()) if key == "boxes" else ()  # masks carry no labels
        ignore_classes = _names(ignore, name, f"{key}.ignore_classes")
        classes = _names(spec.pop("classes", ()), name, f"{key}.classes")
        suffix = spec.pop("suffix", ".png" if fmt == "mask" else "")
        if not isinstance(suffix, str):
            raise SourceError(f"source '{name}': {key}.suffix must be text (the end of the file names, "
                              f"'_mask.png'), got {suffix!r}")
        anns.append(AnnotationSpec(fmt, str(path), suffix, classes, ignore_classes))
        if spec:
            raise SourceError(f"source '{name}': unknown {key} option(s) {sorted(spec)}")
    if d:
        raise SourceError(f"source '{name}': unknown option(s) {sorted(d)}")
    return Source(name, str(root), globs, stride, sort, border,
                  None if black is None else float(black), tuple(anns), expected, channel)


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
    sources = [source_from_dict(e, base) for e in entries]
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
    return file_not_folder(root) or f"folder does not exist: {root}{_found_below(root)}"


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
    """The frames of ``source`` (stride applied), outside the folders ``skip``."""
    root = Path(source.root)
    if problem := _root_problem(root):
        raise SourceError(f"source '{source.name}': root {problem}")
    files: set[str] = set()
    videos: set[str] = set()
    walk = walk_matching(str(root), source.globs, skip)
    for rel in walk.files:
        name = rel.lower()
        kind = files if name.endswith(IMAGE_EXTENSIONS) else videos if name.endswith(VIDEO_EXTENSIONS) else None
        # one stat, only for the files it keeps: a link to nothing stays (its read is a named skip), a
        # FIFO or device named like an image does not (reading it would block)
        if kind is not None and (os.path.isfile(root / rel) or not os.path.exists(root / rel)):
            kind.add(rel)
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
    by_folder: dict[str, list[str]] = {}
    for rel in files:
        by_folder.setdefault(os.path.dirname(rel) or ".", []).append(rel)
    out = Discovery(matched=len(files), all_rel=sorted(files), videos=sorted(videos),
                    links_not_followed=walk.links_not_followed, unreadable_folders=walk.unreadable_folders)
    for folder in sorted(by_folder, key=key):
        frames = sorted(by_folder[folder], key=lambda r: key(os.path.basename(r)))
        for index in range(0, len(frames), source.stride):
            rel = frames[index]
            out.items.append(Item(source.name, str(root / rel), rel, folder, index))
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
