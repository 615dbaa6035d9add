"""YAML configs with dot-list overrides (``key.sub=value``), shared by every stage.

A config file may name a parent with ``_base_: relative/path.yaml``; the child's keys win.
The resolved config is written next to every output so a run can be understood and repeated.
Each stage checks its config against a pydantic schema at load (``schema=``): an unknown key, a
value of the wrong type or out of range is an error naming the key's path, before anything runs.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError


def _config_dir() -> Path:
    """``configs/`` of the checkout, or the copy an installed wheel carries (``irpt_configs``)."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    import importlib.util

    spec = importlib.util.find_spec("irpt_configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return checkout


CONFIG_DIR = _config_dir()


def yaml_problem(path: str | Path, error: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: the file, where, what the parser missed, the usual cause."""
    mark = getattr(error, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(error, "problem", None) or str(error).splitlines()[0]
    return (f"{path}{where}: not valid YAML ({what}); a value holding ': ', ' #', ', ' or brackets "
            "(a path, say) needs quotes")


def _load_with_bases(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_problem(path, e)) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config is a mapping of sections (data:, model:, train:, ...), "
                          "not a list")
    base = cfg.pop("_base_", None)
    if base is None:
        return cfg
    return OmegaConf.merge(_load_with_bases((path.parent / base).resolve()), cfg)


class ConfigError(ValueError):
    """A config that does not fit its schema; one line per problem, each naming the key."""


class Section(BaseModel):
    """A config section: every key declared (a typo is an error), values checked, not coerced
    beyond pydantic's lax rules (``"5"`` is an int, ``"two"`` is not)."""
    model_config = ConfigDict(extra="forbid", frozen=True)


def _section_at(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section (model) that holds the key at the end of ``loc``."""
    import typing

    model = schema
    for part in loc[:-1]:
        if not isinstance(part, str):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _keys(section: type[BaseModel]) -> list[str]:
    """The keys ``section`` takes, each alias of a key included (``glob`` and ``globs``)."""
    keys = []
    for name, field in section.model_fields.items():
        alias = field.validation_alias
        keys += [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else [name]
    return sorted(keys)


def _key_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _described(schema: type[BaseModel], loc: tuple) -> str:
    """The path of the key ``loc`` names, with the key's description where its schema gives one:
    ``channel (0-based, in stored order B, G, R, A)``."""
    keys = [i for i, part in enumerate(loc) if isinstance(part, str)]
    if keys:
        section = _section_at(schema, loc[:keys[-1] + 1])
        field = section.model_fields.get(loc[keys[-1]]) if section is not None else None
        if field is not None and field.description:
            return f"{_key_path(loc)} ({field.description})"
    return _key_path(loc)


def schema_problems(error: ValidationError, schema: type[BaseModel]) -> list[str]:
    """One line per problem of ``error``, each naming the key's path: ``train.epochs: Input should
    be greater than 0 (got 0)``; a problem of the whole section is said alone."""
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            section = _section_at(schema, loc)
            allowed = _keys(section) if section is not None else []
            what = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "missing":
            what = "missing"
        else:  # a validator's own words stand without pydantic's "Value error, ", and the value once
            text = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
            got = f"got {err.get('input')!r}"
            what = text + (f" ({got})" if not isinstance(err.get("input"), dict) and got not in text else "")
        lines.append(f"{_described(schema, loc)}: {what}" if loc else what)
    return lines


def check_config(cfg: DictConfig | dict, schema: type[BaseModel], source: str = "config") -> BaseModel:
    """Validate ``cfg`` against ``schema``; returns the typed config, or raises ConfigError with
    one line per problem: ``train.epochs: Input should be greater than 0 (got 0)``."""
    try:
        return schema.model_validate(to_container(cfg))
    except ValidationError as e:
        lines = schema_problems(e, schema)
        raise ConfigError(f"{source} does not fit its schema ({schema.__name__}):\n  " + "\n  ".join(lines)) from None


_MARK = "\ue000"  # a private-use character standing in for '#'


def _unmark(node):
    if isinstance(node, str):
        return node.replace(_MARK, "#")
    if isinstance(node, list):
        return [_unmark(v) for v in node]
    if isinstance(node, dict):
        return {_unmark(k): _unmark(v) for k, v in node.items()}
    return node


def _has_comment(value: str) -> bool:
    """Whether YAML reads part of ``value`` as a comment (a ``#`` after white space, outside quotes):
    ``data.root=/data/run #2`` would otherwise become ``/data/run`` without a word."""
    if "#" not in value:
        return False
    try:
        as_written = yaml.safe_load(value)
    except yaml.YAMLError:
        return False  # not YAML at all: the override's own parse says so
    try:
        return as_written != _unmark(yaml.safe_load(value.replace("#", _MARK)))
    except yaml.YAMLError:
        return True  # it only parses with the '#' read as a comment


_PLAIN = re.compile(r"[A-Za-z0-9_./+-]+")


def override_arg(key: str, value: str | Path) -> str:
    """``key=value`` as one shell word whose value the override parser reads back as written: a
    path with ``' #'``, ``', '`` or brackets in it is single-quoted for YAML (printed hints and
    commands a user copies)."""
    value = str(value)
    if _PLAIN.fullmatch(value):
        return f"{key}={value}"
    word = "{}='{}'".format(key, value.replace("'", "''"))
    return f'"{word}"' if not re.search(r'[$`"\\!]', word) else shlex.quote(word)


def int_in(minimum: int, maximum: int | None = None):
    """An argparse ``type``: an integer from ``minimum`` to ``maximum`` (argparse then refuses
    anything else with the option's name, before any work)."""
    return _number_in(int, "integer", minimum, maximum)


def float_in(minimum: float, maximum: float | None = None):
    """An argparse ``type``: a number from ``minimum`` to ``maximum``."""
    return _number_in(float, "number", minimum, maximum)


def out_folder(text: str) -> str:
    """An argparse ``type``: a folder to write into, refused (before any work) where a file is or
    where this user cannot write."""
    import argparse

    from data_tools.files import file_not_folder, unwritable

    if problem := file_not_folder(Path(text).expanduser()) or unwritable(Path(text).expanduser()):
        raise argparse.ArgumentTypeError(problem)
    return text


def out_file(default_name: str, suffixes: tuple[str, ...]):
    """An argparse ``type``: a file to write, with one of ``suffixes``; a folder given stands for
    ``FOLDER/default_name`` (refused before any work: a fit of minutes then failed on the name)."""
    import argparse

    from data_tools.files import unwritable

    def parse(text: str) -> str:
        path = Path(text).expanduser()
        if path.is_dir() or text.endswith(("/", os.sep)):  # a folder, there or said as one
            path, text = path / default_name, str(path / default_name)
        elif path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: give a {' / '.join(suffixes)} file, or a folder for its "
                                             f"{default_name}")
        if problem := unwritable(path):
            raise argparse.ArgumentTypeError(problem)
        return text

    parse.__name__ = "output file"
    return parse


def _number_in(kind, name: str, minimum, maximum):
    import argparse

    def parse(text: str):
        value = kind(text)  # not a number: argparse says "invalid <name> value"
        if value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    parse.__name__ = name
    return parse


def _dotted_keys(node, prefix: str = "") -> list[str]:
    """Every key of a config as an override names it (``train.steps``), sections included."""
    if not isinstance(node, DictConfig):
        return []
    keys = []
    for name, value in node.items_ex(resolve=False):
        keys += [f"{prefix}{name}", *_dotted_keys(value, f"{prefix}{name}.")]
    return keys


def _expand_home(node) -> None:
    """``~/data`` in a config (a file or an override) means the home folder, as in a shell: no
    shell expands it there, and a path starting with ``~`` is nothing else."""
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
    for key, value in list(items):
        if isinstance(value, (DictConfig, ListConfig)):
            _expand_home(value)
        elif isinstance(value, str) and (value == "~" or value.startswith("~/")):
            node[key] = os.path.expanduser(value)


def load_config(path: str | Path, overrides: Iterable[str] = (), schema: type[BaseModel] | None = None) -> DictConfig:
    """Load ``path`` (following ``_base_``), apply ``key=value`` overrides and, with ``schema``,
    check every key and value (:func:`check_config`).

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
        key, value = item.split("=", 1)
        if _has_comment(value):
            raise ValueError(f"override '{item}': YAML reads what follows '#' as a comment and would drop it; "
                             f"quote the value: {override_arg(key, value)}")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            close = difflib.get_close_matches(key, _dotted_keys(cfg), n=1, cutoff=0.8)
            raise ConfigError(f"override '{item}': the config {path} has no key '{key}'"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    _expand_home(cfg)
    if schema is not None:
        check_config(cfg, schema, f"{path}" + (" with its overrides" if overrides else ""))
    return cfg


def to_container(cfg: DictConfig | dict) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return cfg


def config_hash(cfg: DictConfig | dict) -> str:
    """A stable hash of a config's resolved content (key order does not matter)."""
    text = json.dumps(to_container(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _saved_config(saved: str | Path | dict) -> dict | None:
    """A saved resolved config: a YAML file's, or one already read (a manifest's); None where unreadable."""
    if isinstance(saved, dict):
        return saved
    try:
        return to_container(OmegaConf.load(saved))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def config_changes(saved: str | Path | dict, cfg: DictConfig | dict, most: int = 6) -> list[str]:
    """``key: then -> now`` for each setting of ``cfg`` that differs from the resolved config saved
    at ``saved`` (a file, or the config itself; dotted keys; a key the saved config lacks, a setting
    newer than its run, reads ``absent``), at most ``most`` of them and a count of the rest; [] where
    ``saved`` is unreadable."""
    then = _saved_config(saved)
    if then is None:
        return []
    then = _flat(then)
    now = _flat(to_container(cfg))
    missing = object()

    def shown(values: dict, key: str) -> str:
        value = values.get(key, missing)
        return "absent" if value is missing else json.dumps(value)

    changed = [f"{k}: {shown(then, k)} -> {shown(now, k)}" for k in sorted(set(then) | set(now))
               if then.get(k, missing) != now.get(k, missing)]
    return changed[:most] + ([f"{len(changed) - most} more"] if len(changed) > most else [])


def earlier_version_of(saved: str | Path | dict, saved_hash: str | None, cfg: DictConfig | dict) -> bool:
    """Whether ``cfg`` is the config saved at ``saved`` (a file, or the config itself; its hash was
    ``saved_hash``) as a later version of the toolkit reads it: equal once the settings the saved
    one lacks are left out (a run started before those settings existed)."""
    return equal_but_for(saved, saved_hash, cfg, ())


_ABSENT = object()


def equal_but_for(saved: str | Path | dict, saved_hash: str | None, cfg: DictConfig | dict,
                  keys: Iterable[str]) -> bool:
    """Whether ``cfg`` is the config saved at ``saved`` (its hash was ``saved_hash``) once the dotted
    ``keys`` take their saved values and the settings the saved one lacks are left out."""
    then = _saved_config(saved)
    if then is None or saved_hash is None:
        return False
    saved_cfg, now = OmegaConf.create(then), OmegaConf.create(to_container(cfg))  # a copy: cfg stays as it is
    for key in keys:
        value = OmegaConf.select(saved_cfg, key, default=_ABSENT)
        if value is not _ABSENT:
            OmegaConf.update(now, key, value, force_add=True)
    return config_hash(_within(to_container(now), then)) == saved_hash


def as_the_run_began(cfg: DictConfig | dict, saved: str | Path | dict, section: str) -> tuple[DictConfig, list[str]]:
    """``cfg`` without the settings of ``section`` that the config saved at ``saved`` (a file, or the
    config itself) lacks, and their dotted names: in a run an earlier version of the toolkit began, a
    setting added since keeps the meaning its absence had then. ``cfg`` unchanged where nothing is
    left out or ``saved`` is unreadable."""
    then, now = _saved_config(saved), to_container(cfg)
    if then is None or not isinstance(then.get(section), dict) or not isinstance(now.get(section), dict):
        return cfg, []
    kept = _within(now[section], then[section])
    left_out = sorted(set(_flat(now[section], f"{section}.")) - set(_flat(kept, f"{section}.")))
    return (OmegaConf.create(dict(now, **{section: kept})), left_out) if left_out else (cfg, [])


def _within(tree: Any, shape: Any) -> Any:
    """``tree`` without the dict keys ``shape`` lacks, in dicts and in lists of equal length."""
    if isinstance(tree, dict) and isinstance(shape, dict):
        return {k: _within(v, shape[k]) for k, v in tree.items() if k in shape}
    if isinstance(tree, list) and isinstance(shape, list) and len(tree) == len(shape):
        return [_within(v, s) for v, s in zip(tree, shape)]
    return tree


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict's leaves (an empty dict is a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.removesuffix("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def save_resolved(cfg: DictConfig | dict, out_dir: str | Path, name: str = "config.yaml") -> Path:
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(to_container(cfg)), out)
    return out
