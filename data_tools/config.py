"""YAML configs with dot-list overrides (``key.sub=value``), shared by every stage.

A config file may name a parent with ``_base_: relative/path.yaml``; the child's keys win.
The resolved config is written next to every output so a run can be understood and repeated.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _load_with_bases(path: Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    base = cfg.pop("_base_", None)
    if base is None:
        return cfg
    return OmegaConf.merge(_load_with_bases((path.parent / base).resolve()), cfg)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Load ``path`` (following ``_base_``) and apply ``key=value`` overrides.

    Overriding a key the config does not define is an error: a typo must not pass silently.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = _load_with_bases(path.resolve())
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise KeyError(f"override '{item}': the config {path} has no key '{key}'")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return cfg


def to_container(cfg: DictConfig | dict) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return cfg


def config_hash(cfg: DictConfig | dict) -> str:
    """A stable hash of a config's resolved content (key order does not matter)."""
    text = json.dumps(to_container(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_resolved(cfg: DictConfig | dict, out_dir: str | Path, name: str = "config.yaml") -> Path:
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(to_container(cfg)), out)
    return out
