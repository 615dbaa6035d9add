"""The files under a root that match glob patterns, each folder read once.

Python's ``glob.glob(recursive=True)`` follows every link to a folder, with no memory of where it
has been: a link to a parent (``loop/up -> ..``) makes it list the tree again at each depth until
the kernel refuses the path (40 copies of every frame), and two such links make it exponential.
Here the tree is walked once: a linked folder is followed only when it leads outside the tree and
to a folder not read yet, so a dataset linked in from another disk is read, and loops and second
names of a folder are counted and passed by. The patterns keep glob's rules (``**`` any number of
folders, ``*`` / ``?`` / ``[...]`` within one name, names starting with ``.`` matched only by a
pattern segment that starts with ``.``).
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Walk:
    files: list[str] = field(default_factory=list)  # relative, POSIX separators, sorted
    links_not_followed: list[str] = field(default_factory=list)  # linked folders read under another name
    unreadable_folders: list[str] = field(default_factory=list)  # folders whose listing failed (permissions)


def _has_magic(segment: str) -> bool:
    return any(c in segment for c in "*?[")


def _segment_matches(name: str, pattern: str) -> bool:
    if not _has_magic(pattern):
        return name == pattern
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _matches(parts: Sequence[str], patterns: Sequence[str]) -> bool:
    """Whether the path ``parts`` matches the pattern segments ``patterns`` whole."""
    if not patterns:
        return not parts
    head, rest = patterns[0], patterns[1:]
    if head == "**":  # zero or more folders (or files, at the end), none of them hidden
        return _matches(parts, rest) or bool(parts) and not parts[0].startswith(".") and _matches(parts[1:], patterns)
    return bool(parts) and _segment_matches(parts[0], head) and _matches(parts[1:], rest)


def _may_match_below(parts: Sequence[str], patterns: Sequence[str]) -> bool:
    """Whether a path below the folder ``parts`` can match: folders no pattern reaches are not read."""
    if not parts:
        return bool(patterns)
    if not patterns:
        return False
    head, rest = patterns[0], patterns[1:]
    if head == "**":
        return (_may_match_below(parts, rest)
                or not parts[0].startswith(".") and _may_match_below(parts[1:], patterns))
    return _segment_matches(parts[0], head) and _may_match_below(parts[1:], rest)


def split_pattern(pattern: str) -> list[str]:
    return [s for s in pattern.replace(os.sep, "/").split("/") if s not in ("", ".")]


def path_matches(rel: str, patterns: Sequence[str]) -> bool:
    """Whether ``rel`` (a path below a root, POSIX separators) matches one of ``patterns`` as the walk
    matches them."""
    parts = split_pattern(rel)
    return any(_matches(parts, split_pattern(p)) for p in patterns)


def walk_matching(root: str, patterns: Sequence[str], skip: Sequence[str] = ()) -> Walk:
    """Every file (or link to one, dangling included: the reader names it) under ``root`` whose
    relative path matches one of ``patterns``, outside the folders ``skip`` (the build's own output).
    Folders are read in sorted order, so which name a folder reached twice keeps does not depend on
    the file system's listing order."""
    split = [split_pattern(p) for p in patterns]
    top = os.path.realpath(root)
    seen = {top, *(os.path.realpath(s) for s in skip)}
    out = Walk()
    def unreadable(error: OSError) -> None:
        out.unreadable_folders.append(os.path.relpath(error.filename, top).replace(os.sep, "/"))

    for here, dirs, files in os.walk(top, onerror=unreadable, followlinks=True):
        rel_here = os.path.relpath(here, top)
        parts = [] if rel_here == "." else rel_here.split(os.sep)
        kept = []
        for d in sorted(dirs):
            full = os.path.join(here, d)
            if not any(_may_match_below(parts + [d], p) for p in split):
                continue
            real = os.path.realpath(full)
            inside = real == top or real.startswith(top + os.sep)
            if real in seen and not os.path.islink(full):  # a folder of ``skip``
                continue
            if os.path.islink(full) and (inside or real in seen):
                out.links_not_followed.append("/".join(parts + [d]))
                continue
            seen.add(real)
            kept.append(d)
        dirs[:] = kept
        for f in files:
            if any(_matches(parts + [f], p) for p in split):
                out.files.append("/".join(parts + [f]))
    out.files.sort()
    out.links_not_followed.sort()
    out.unreadable_folders.sort()
    return out
