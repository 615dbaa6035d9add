"""An exported backbone's JSON (``backbone.json`` beside ``backbone.pth``): the format, and the one
reader of it. Reading it needs no torch, so that ``summary`` and config checks stay fast."""
from __future__ import annotations

import json
from pathlib import Path

BACKBONE_FORMAT = "irpt-backbone"
BACKBONE_VERSION = 2  # 2: adapters as a list of (name, settings) and the input normalisation; 1 still loads
_RERUN = "re-run `python -m pretrain export` to write the pair again"


class WeightsError(ValueError):
    pass


def _json_beside(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def read_backbone_meta(path: str | Path) -> dict:
    json_path = _json_beside(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: the backbone's config JSON is missing (written by export)")
    try:
        meta = json.loads(json_path.read_text(errors="replace"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{json_path}: not readable JSON ({e}): an export stopped while writing it? {_RERUN}") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != BACKBONE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise WeightsError(f"{json_path}: not an exported backbone (format {found!r})")
    version = meta.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= BACKBONE_VERSION:
        raise WeightsError(f"{json_path}: export format version {version!r}, and this toolkit reads versions 1 to "
                           f"{BACKBONE_VERSION}: written by a newer release? Update, or export with this one")
    needed = ("encoder", "adapter", "pad") if version == 1 else ("encoder", "adapters", "input")
    lacking = [k for k in needed if k not in meta]
    if lacking:
        raise WeightsError(f"{json_path}: export format version {version} lacks {lacking}; {_RERUN}")
    if version == 1:  # one adapter by name, PAD's settings beside it, no input normalisation
        meta["adapters"] = [] if meta["adapter"] == "none" else [{"name": "pad", "settings": meta["pad"]}]
        meta["input"] = None
    return meta


def adapter_names(meta: dict) -> list[str]:
    return [a["name"] for a in meta["adapters"]]


def is_exported_backbone(path: str | Path) -> bool:
    """Whether ``path`` is an export: the JSON beside it says our format. Another JSON beside a
    checkpoint (a training script's arguments) is not ours; ours cut short by a stopped export is
    refused, not taken for a plain checkpoint (its adapters would be lost or refused for a reason
    that names neither file)."""
    json_path = _json_beside(path)
    if not json_path.is_file():
        return False
    text = json_path.read_text(errors="replace")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        if f'"{BACKBONE_FORMAT}"' in text:
            read_backbone_meta(path)  # raises, saying why
        return False
    return isinstance(meta, dict) and meta.get("format") == BACKBONE_FORMAT


def check_tensor_counts(meta: dict, path: str | Path, tensors: int, parameters: int) -> None:
    """Refuse a .pth whose tensor and parameter counts are not those its JSON recorded: the two files
    of two exports (one stopped between them) would otherwise load one run's weights into another's
    architecture, or fail on a missing tensor without naming the cause."""
    said = (meta.get("num_tensors"), meta.get("num_parameters"))
    if None not in said and said != (tensors, parameters):
        raise WeightsError(f"{path} holds {tensors} tensors, {parameters} parameters; {_json_beside(path).name} "
                           f"beside it says {said[0]}, {said[1]}: the two files are of different exports (one "
                           f"stopped half-way?); {_RERUN}")
