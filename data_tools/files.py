"""File helpers shared by every stage: checksums, atomic writes, our append-only JSONL logs."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence

import yaml


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Errors of the storage written to, not of the data: a full disk or quota, a read-only mount.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def storage_problem(e: OSError) -> str | None:
    """``e`` said as a problem of the storage written to (``No space left on device: PATH``), or
    None when it is another error."""
    if e.errno not in STORAGE_ERRNOS:
        return None
    return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")


def is_entry_to_read(path: str | Path) -> bool:
    """Whether a folder entry named like a frame or an annotation file is one to read: a regular file,
    or a link to nothing (its read is then a named skip). A folder, FIFO or device so named is not:
    reading a FIFO would wait until something writes to it."""
    return os.path.isfile(path) or not os.path.exists(path)


def atomic_write(path: str | Path, write: Callable[[IO], object], binary: bool = False) -> None:
    """``write(file)`` to a temporary name, made durable, then renamed: readers see old or new, never half."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half file left beside the whole one (a kill -9 leaves it)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def read_jsonl(path: str | Path) -> tuple[list[dict], str | None]:
    """Records of one of our append-only JSONL logs, and the torn final line if there is one.

    A process killed in the middle of an append leaves a partial last line: that line is dropped
    (and returned, for the caller to report). An unreadable line anywhere else is corruption,
    not an interrupted append, and raises with its line number."""
    lines = Path(path).read_text().split("\n")
    complete, last = lines[:-1], lines[-1]  # every complete record ends with a newline
    records = []
    for number, line in enumerate(complete, 1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not JSON ({e}); the log is corrupt") from None
    return records, (last or None)  # text after the last newline: an append that was cut short


def trim_jsonl(path: str | Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSONL log with only the records ``keep`` accepts (a resumed run drops the steps
    it will redo); a torn final line is dropped with a warning."""
    records, torn = read_jsonl(path)
    if torn is not None:
        print(f"warning: {path}: dropped a torn final line ({len(torn)} characters; a run was killed "
              "mid-write)", file=sys.stderr)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records if keep(r)))


def file_not_folder(path: str | Path) -> str | None:
    """Where a folder was expected and ``path`` is a file (one frame, a video, an archive): the line
    that says so and names the folder holding it; None otherwise (a folder, or nothing there)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file where a folder is expected (the folder holding it: {path.parent})"
    return None


def missing_folder(path: str | Path) -> str:
    """The line for a folder that is not there (or is a file), with :func:`folder_hint`."""
    return file_not_folder(path) or f"{path}: no such folder{folder_hint(path)}"


def folder_hint(path: str | Path) -> str:
    """For a folder that is not there, what the folder above it holds: an entry named the same but for
    case (``Infrared`` against ``infrared``: a download renamed, or unpacked on a file system that
    ignores case), else its subfolders; '' where that folder is not there either."""
    path = Path(path)
    try:
        subfolders = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
    except OSError:  # not there, or not listable
        return ""
    same = [name for name in subfolders if name.lower() == path.name.lower()]
    if same:
        return f"; {path.parent / same[0]} differs in case only (names are case-sensitive here)"
    if subfolders:
        return f"; {path.parent} holds {', '.join(subfolders[:12])}{', ...' if len(subfolders) > 12 else ''}"
    return ""


def unwritable(path: str | Path) -> str | None:
    """Where this user cannot write ``path`` (a folder or file to write, there or not yet): the line
    that says so, naming the folder in the way (not writable, or on a read-only mount); None otherwise.
    The commands check their outputs with it before any work: a build or a run's start ended in a
    PermissionError traceback there."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    folder = existing if existing.is_dir() else existing.parent
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    where = "it" if folder == path else f"{folder} (where it would go)"
    return f"{path}: this user cannot write {where}: no permission, or a read-only mount; choose another place"


def folders_below(base: str | Path, relative: Sequence[str], depth: int = 2) -> Iterator[Path]:
    """Folders up to ``depth`` levels below ``base`` (nearest first, then by name) that hold every
    folder (or file, such as a ``data.yaml``) of ``relative``: where a dataset that unpacked into a
    folder of its own (``MSRS-main/``) really is. Unreadable folders are passed by."""
    def subfolders(folder: Path) -> list[Path]:
        try:
            return sorted(c for c in folder.iterdir() if c.is_dir())
        except OSError:
            return []

    level = [Path(base)]
    for _ in range(depth):
        level = [c for folder in level for c in subfolders(folder)]
        yield from (c for c in level if all((c / r).exists() for r in relative))


# What each of our output folders is, and what to do with it: said when one is given to a command
# that takes another (an export of a fine-tuning run, a prediction with a pre-training run).
FOLDER_KINDS = {
    "shards": ("a shard folder (data_tools build)", "pre-train on it: data.shards=[{path: DIR}]"),
    "pretrain": ("a pre-training run", "python -m pretrain export DIR --out backbone.pth makes the backbone "
                 "fine-tuning takes as init.checkpoint"),
    "seg": ("a segmentation fine-tuning run", "python -m finetune predict DIR applies it to new frames"),
    "det": ("a detection fine-tuning run", "python -m finetune predict DIR applies it to new frames"),
}

PRETRAIN_RUNS, FINETUNE_RUNS = ("pretrain",), ("seg", "det")


def folder_kind(folder: str | Path) -> str | None:
    """Which of FOLDER_KINDS ``folder`` is, from the ``config.yaml`` each of them saves; None for a
    folder without one, or with a config of something else."""
    path = Path(folder) / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict):
        return None
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    if "build" in cfg and "sources" in cfg:
        return "shards"
    if "shards" in data:
        return "pretrain"
    if "layout" in data:
        return "det" if "boxes" in data else "seg"
    return None


def check_folder_kind(folder: str | Path, kinds: tuple[str, ...]) -> None:
    """Refuse a folder of ours that is not one of ``kinds``, saying what it is and what it is for."""
    kind = folder_kind(folder)
    if kind is not None and kind not in kinds:
        wanted = ("a fine-tuning run" if set(kinds) <= {"seg", "det"}
                  else " or ".join(FOLDER_KINDS[k][0] for k in kinds))
        what, use = FOLDER_KINDS[kind]
        raise ValueError(f"{folder} is {what}, not {wanted} ({use.replace('DIR', str(folder))})")
