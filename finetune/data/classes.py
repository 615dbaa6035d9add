"""Class names from the dataset's own file (``data.classes_file``): Ultralytics / Roboflow YOLO
datasets ship a ``data.yaml`` whose ``names`` (a list, or a map of id: name) the label files'
class ids index; LabelImg and darknet write ``classes.txt`` / ``obj.names``, one name per line
(or ``id name``). Reading them, rather than retyping them, keeps the ids and names in one order.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from data_tools.config import ConfigError, override_arg, yaml_problem
from data_tools.files import missing_folder


TEXT_CLASS_FILES = (".txt", ".names")  # one name per line: LabelImg's classes.txt, darknet's obj.names
# The files a YOLO dataset names its classes in, where its tools write them (the root, the label folder).
SHIPPED_CLASS_FILES = ("data.yaml", "classes.txt", "obj.names")


def _text_class_names(path: Path) -> list[str]:
    """A name per line; lines of ``id name`` with ids 0 .. n-1 (as some datasets write it) give the
    names in id order."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    pairs = [line.split(maxsplit=1) for line in lines]
    if lines and all(len(p) == 2 and p[0].isdigit() for p in pairs):
        by_id = {int(i): name.strip() for i, name in pairs}
        if sorted(by_id) == list(range(len(lines))):
            return [by_id[i] for i in range(len(lines))]
    if not lines:
        raise ConfigError(f"data.classes_file {path}: no class names (one per line)")
    return lines


def read_class_names(path: str | Path) -> list[str]:
    """The ``names`` of a YAML file, in id order (ids of a map must be 0 .. n-1), or the lines of a
    ``.txt`` / ``.names`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.classes_file {path}: no such file (or give data.classes=[...])")
    if path.suffix.lower() in TEXT_CLASS_FILES:
        return _text_class_names(path)
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"data.classes_file {yaml_problem(path, e)}") from None
    names = content.get("names") if isinstance(content, dict) else None
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            ids = None
        if ids != list(range(len(names))):
            raise ConfigError(f"data.classes_file {path}: the ids of 'names' must be 0 .. {len(names) - 1}, "
                              f"got {list(names)}")
        names = [names[k] if k in names else names[str(k)] for k in ids]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise ConfigError(f"data.classes_file {path}: expected 'names' as a list of class names or a map of "
                          f"id: name (Ultralytics' data.yaml), got {names!r}")
    return [str(n) for n in names]


def resolve_classes(cfg) -> None:
    """Fill ``cfg.data.classes`` from ``data.classes_file`` (relative: under ``data.root``) where
    it is empty. Where both are given, data.classes picks the classes to train, in its own order,
    among the file's (the label files' ids index the file's names; boxes of the others are left
    out and counted, or are ignore regions when data.ignore_classes names them)."""
    data = cfg.data
    path = _classes_file(data)
    if path is None:
        return
    if data.classes and not path.is_file():
        return  # the names are given; the file is only where a dataset ships one
    if not path.is_file() and not Path(data.classes_file).is_absolute():
        _refuse_missing(Path(data.root), data.classes_file)
    names = read_class_names(path)
    if not data.classes:
        data.classes = names
    elif unknown := [c for c in data.classes if c not in names]:
        raise ConfigError(f"data.classes names {unknown}, which {path} does not ({names}): the label files' class "
                          "ids index that file's names; data.classes may pick some of them, in any order")


def label_id_names(data) -> tuple[str, ...]:
    """The names YOLO class ids index: ``data.classes_file``'s where the dataset has it (data.classes
    may then be some of them, in another order), else data.classes."""
    path = _classes_file(data)
    return tuple(read_class_names(path)) if path is not None and path.is_file() else tuple(data.classes)


def _classes_file(data) -> Path | None:
    name = data.get("classes_file")
    if not name:
        return None
    if Path(name).is_absolute():
        return Path(name)
    if not data.root:
        raise ConfigError(f"data.classes_file {name} is relative to data.root, which is not set")
    return Path(data.root) / name


def _refuse_missing(root: Path, name: str) -> None:
    """The dataset is not where ``data.root`` says: name where it is when it unpacked one or two
    folders down (a zip's own folder), as the layout check does."""
    from data_tools.files import folders_below

    if not root.is_dir():
        raise FileNotFoundError(f"data.root {missing_folder(root)}")
    where = next(folders_below(root, [name]), None)
    if where is not None:
        raise FileNotFoundError(f"data.classes_file {root / name}: no such file, but the dataset is under {where}: "
                                f"use {override_arg('data.root', str(where))}")
    raise FileNotFoundError(f"data.classes_file {root / name}: no such file (or give data.classes=[...])")


def misordered_classes_problem(data) -> str | None:
    """For YOLO labels (class ids) with ``data.classes`` typed in (no ``classes_file``), a class file
    the dataset ships (SHIPPED_CLASS_FILES in ``data.root``, the label folder or the folder above it)
    that puts a name of ``data.classes`` at another id: every box of that class would train as
    another. Names the file does not hold (a renamed class) are not refused. ``data``: one split's
    (``data_for_split``: the box path filled in and under the root)."""
    if data.boxes.format != "yolo" or data.get("classes_file") or not data.root:
        return None
    folders = [Path(data.root)]
    if data.boxes.path and "{" not in data.boxes.path:
        labels = Path(data.boxes.path) if Path(data.boxes.path).is_absolute() else Path(data.root) / data.boxes.path
        folders += [labels, labels.parent]
    for folder in dict.fromkeys(folders):
        for name in SHIPPED_CLASS_FILES:
            path = folder / name
            if not path.is_file():
                continue
            try:
                shipped = read_class_names(path)
            except (ConfigError, OSError):
                continue
            moved = [(c, i, shipped.index(c)) for i, c in enumerate(data.classes)
                     if c in shipped and shipped.index(c) != i]
            if moved:
                c, ours, theirs = moved[0]
                relative = path.relative_to(data.root) if path.is_relative_to(data.root) else path
                return (f"data.classes {list(data.classes)} puts {c} at id {ours}, but the dataset's {path} names the "
                        f"classes in id order {shipped} ({c} at {theirs}): the label files' ids index that order, so "
                        f"{c} boxes would train as another class. Use data.classes_file={relative} (data.classes then "
                        "picks among its names, in any order), or give data.classes in that order")
    return None
