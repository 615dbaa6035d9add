"""An exported backbone's JSON (``backbone.json`` beside ``backbone.pth``): the format, and the one
reader of it. Reading it needs no torch, so that ``summary`` and config checks stay fast."""
from __future__ import annotations

import json
from pathlib import Path

BACKBONE_FORMAT = "irpt-backbone"
BACKBONE_VERSION = 2  # 2: adapters as a list of (name, settings) and the input normalisation; 1 still loads


class WeightsError(ValueError):
    pass


def read_backbone_meta(path: str | Path) -> dict:
    json_path = Path(path).with_suffix(".json")
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: the backbone's config JSON is missing (written by export)")
    meta = json.loads(json_path.read_text())
    if meta.get("format") != BACKBONE_FORMAT:
        raise WeightsError(f"{json_path}: not an exported backbone (format {meta.get('format')!r})")
    if meta.get("version", 1) == 1:  # one adapter by name, PAD's settings beside it, no input normalisation
        meta["adapters"] = [] if meta["adapter"] == "none" else [{"name": "pad", "settings": meta["pad"]}]
        meta["input"] = None
    return meta


def adapter_names(meta: dict) -> list[str]:
    return [a["name"] for a in meta["adapters"]]


def is_exported_backbone(path: str | Path) -> bool:
    json_path = Path(path).with_suffix(".json")
    if not json_path.is_file():
        return False
    try:
        return json.loads(json_path.read_text()).get("format") == BACKBONE_FORMAT
    except json.JSONDecodeError:
        return False
