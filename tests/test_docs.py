"""The commands the README and the launch examples show are ones the tools take: each subcommand and
flag of the ``python -m`` CLIs, each run.sh option, and each config key given as ``key=value``. A
renamed flag or key otherwise leaves the documentation wrong without a test noticing."""
import argparse
import importlib
import re
import subprocess
import typing

import pytest
from pydantic import BaseModel

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "launch").iterdir())]
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _text() -> str:
    return "\n".join(path.read_text() for path in DOCS)


def _unquoted(command: str) -> str:
    """A command without its comment and quoted arguments (passed verbatim to another tool)."""
    return re.sub(r"\"[^\"]*\"|'[^']*'", "", command.split(" #")[0])


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def cli_problems(text: str) -> list[str]:
    parsers = {m: importlib.import_module(f"{m}.cli").make_parser() for m in ("data_tools", "pretrain", "finetune")}
    problems = []
    for found in re.finditer(r"python -m (data_tools|pretrain|finetune) ([a-z][a-z_|-]*)([^`\n]*)", text):
        module, names, rest = found.groups()
        choices = _subcommands(parsers[module])
        for name in names.split("|"):
            if name not in choices:
                problems.append(f"{found.group(0)[:80]}: {module} has no subcommand {name}")
                continue
            flags = {o for a in choices[name]._actions for o in a.option_strings}
            problems += [f"{found.group(0)[:80]}: {module} {name} has no {flag}"
                         for flag in FLAG.findall(_unquoted(rest)) if flag not in flags]
    return problems


def run_sh_problems(text: str) -> list[str]:
    usage = subprocess.run(["bash", str(ROOT / "run.sh"), "--help"], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    options = set(FLAG.findall(usage)) | {"--help", "-h"}
    problems = []
    for found in re.finditer(r"\./run\.sh([^`\n]*)", text):
        args = re.split(r"(?:^|\s)(?:test|--)(?:\s|$)", _unquoted(found.group(1)))[0]  # pytest's, the trainer's
        problems += [f"{found.group(0)[:80]}: run.sh has no {flag}" for flag in FLAG.findall(args)
                     if flag not in options]
    return problems


def _key_paths(model: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Every key of a config schema -> whether it is a free mapping (any key below it)."""
    paths = {}
    for name, field in model.model_fields.items():
        nested = [c for c in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(c, type) and issubclass(c, BaseModel)]
        paths[prefix + name] = not nested and dict in (field.annotation, typing.get_origin(field.annotation))
        if nested:
            paths.update(_key_paths(nested[0], prefix + name + "."))
    return paths


def config_key_problems(text: str) -> list[str]:
    from data_tools.schema import BuildConfig
    from finetune.schema import DetConfig, SegConfig
    from pretrain.schema import PretrainConfig

    paths: dict[str, bool] = {}
    for schema in (BuildConfig, PretrainConfig, SegConfig, DetConfig):
        paths.update(_key_paths(schema))

    def known(key: str) -> bool:
        parts = key.split(".")
        return key in paths or any(paths.get(".".join(parts[:i])) for i in range(1, len(parts)))

    keys = set(re.findall(r"(?<![\w./-])([a-z_]+(?:\.[a-z_0-9]+)+)=", text))
    assert len(keys) > 10, keys  # the pattern still finds the overrides
    return [f"{key}=: no config has this key" for key in sorted(keys) if not known(key)]


@pytest.mark.parametrize("check", [cli_problems, run_sh_problems, config_key_problems])
def test_what_the_documentation_shows_the_tools_take(check):
    assert check(_text()) == []


def test_the_checks_find_a_renamed_flag_subcommand_option_and_key():
    assert cli_problems("`python -m data_tools build --sources s.yaml --out-dir x`") == [
        "python -m data_tools build --sources s.yaml --out-dir x: data_tools build has no --out-dir"]
    assert cli_problems("python -m finetune seg|detect --config c")[0].endswith("finetune has no subcommand detect")
    assert run_sh_problems("`./run.sh --data d --nodes 2 -- train.epochs=1`") == [
        "./run.sh --data d --nodes 2 -- train.epochs=1: run.sh has no --nodes"]
    assert run_sh_problems('./run.sh test -m slow --dist load; ./run.sh seg --launcher-args "--max_restarts 0"') == []
    text = _text()
    assert config_key_problems(text + "\n`train.epoch=2` and `data.split_dirs.val=valid`") == [
        "train.epoch=: no config has this key"]


def test_the_readme_sources_example_is_a_sources_file(tmp_path):
    """The README's sources YAML, as a user copies it: every key read (an unknown one is an error)."""
    from data_tools.sources import load_sources

    examples = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(examples) == 1
    (tmp_path / "sources.yaml").write_text(examples[0])
    sources = load_sources(tmp_path / "sources.yaml")
    assert [s.name for s in sources] == ["dronevehicle", "scut_fir", "lasher", "llvip", "sirst", "mfnet"]
    by_name = {s.name: s for s in sources}
    assert by_name["dronevehicle"].border_crop == (100, 100, 100, 100) and by_name["scut_fir"].stride == 10
    assert [a.format for a in by_name["sirst"].annotations] == ["voc", "mask"]
