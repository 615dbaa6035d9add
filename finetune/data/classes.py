"""Class names from the dataset's own file (``data.classes_file``): Ultralytics / Roboflow YOLO
datasets ship a ``data.yaml`` whose ``names`` (a list, or a map of id: name) the label files'
class ids index. Reading them, rather than retyping them, keeps the ids and names in one order.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from data_tools.config import ConfigError, override_arg, yaml_problem
from data_tools.files import file_not_folder


def read_class_names(path: str | Path) -> list[str]:
    """The ``names`` of a YAML file, in id order; ids of a map must be 0 .. n-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.classes_file {path}: no such file (or give data.classes=[...])")
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
    it is empty; where both are given, they must agree (the label files' ids index the names)."""
    data = cfg.data
    name = data.get("classes_file")
    if not name:
        return
    path = Path(name)
    if not path.is_absolute():
        if not data.root:
            raise ConfigError(f"data.classes_file {name} is relative to data.root, which is not set")
        path = Path(data.root) / path
    if data.classes and not path.is_file():
        return  # the names are given; the file is only where a dataset ships one
    if not path.is_file() and not Path(name).is_absolute():
        _refuse_missing(Path(data.root), name)
    names = read_class_names(path)
    if data.classes and list(data.classes) != names:
        raise ConfigError(f"data.classes {list(data.classes)} differ from the names in {path} {names}: the label "
                          f"files' class ids index that file's order; drop data.classes or give the same names")
    data.classes = names


def _refuse_missing(root: Path, name: str) -> None:
    """The dataset is not where ``data.root`` says: name where it is when it unpacked one or two
    folders down (a zip's own folder), as the layout check does."""
    from data_tools.files import folders_below

    if not root.is_dir():
        raise FileNotFoundError(f"data.root {file_not_folder(root) or f'{root} is not a folder'}")
    where = next(folders_below(root, [name]), None)
    if where is not None:
        raise FileNotFoundError(f"data.classes_file {root / name}: no such file, but the dataset is under {where}: "
                                f"use {override_arg('data.root', str(where))}")
    raise FileNotFoundError(f"data.classes_file {root / name}: no such file (or give data.classes=[...])")
