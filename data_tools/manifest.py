"""A shard folder's ``manifest.json``: the one reader every tool that opens a shard folder uses."""
from __future__ import annotations

import json
from pathlib import Path

from data_tools import dirlock

MANIFEST = "manifest.json"


class ManifestError(ValueError):
    pass


def read_manifest(folder: str | Path, complete: bool = True) -> dict:
    """The manifest of ``folder``; ``complete``: refuse a build that has not finished."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        below = sorted(p.parent for p in Path(folder).glob(f"*/{MANIFEST}")) + \
            sorted(p.parent for p in Path(folder).glob(f"*/*/{MANIFEST}"))
        where = (f"; the shard folder(s) below it: {', '.join(map(str, below[:3]))}"
                 + (", ..." if len(below) > 3 else "") + ": give one (or each) of them") if below else ""
        raise ManifestError(f"{folder}: no {MANIFEST} (not a shard folder: build one with "
                            f"`python -m data_tools build`){where}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not readable JSON ({e}); rebuild the shards") from None
    if complete and manifest.get("status") != "complete":
        writer = dirlock.holder_if_busy(Path(folder))
        if writer:
            raise ManifestError(f"{folder}: a shard build is writing it now ({writer}); wait for it to finish")
        raise ManifestError(f"{folder}: the shard build is not complete (status {manifest.get('status')!r}); "
                            "rerun it to finish")
    return manifest


def shards_summary(folder: str | Path) -> list[str]:
    """What a finished shard folder holds, as the pipeline's summary prints it."""
    folder = Path(folder)
    m = read_manifest(folder)
    t = m["totals"]
    lines = [f"shards     {folder}: {len(m['shards'])} shards, {t['written']} samples ({t['skipped']} skipped of "
             f"{t['found']} found), {t['proposals']} proposals"]
    if (folder / "preview.png").is_file():
        lines.append(f"preview    {folder / 'preview.png'}")
    return lines
