"""Every command-line entry point: a parser from `build_parser()`, named as people run it, every option explained."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "flows", "benchmarks")
SCRIPTS = REPO / "infra" / "scripts"  # run by path: python infra/scripts/NAME.py
HIDDEN = {("components.predict", "--input")}  # deprecated spellings, accepted but not shown in --help


def _runs_as_a_program(path: Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")


def console_scripts() -> dict[str, str]:
    """module -> console script name, from pyproject's [project.scripts] (only `module:main` entries)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    return {target.removesuffix(":main"): name for name, target in scripts.items() if target.endswith(":main")}


BENCHMARK_WORK = REPO / "benchmarks" / "work"  # benchmark workspaces (git-ignored copies of the project)


def entry_points() -> list[tuple[str, str]]:
    """(how to import it, the prog its parser must show) for every file people run."""
    scripts = console_scripts()
    found = [
        (module, scripts.get(module, f"python -m {module}"))
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if not path.is_relative_to(BENCHMARK_WORK)
        and _runs_as_a_program(path)
        and (module := ".".join(path.relative_to(REPO).with_suffix("").parts))
    ]
    found += [
        (str(path), f"python {path.relative_to(REPO).as_posix()}")
        for path in sorted(SCRIPTS.glob("*.py"))
        if _runs_as_a_program(path)
    ]
    return found


def load(target: str) -> ModuleType:
    if not target.endswith(".py"):
        return importlib.import_module(target)
    name = Path(target).stem
    if name in sys.modules:  # loaded before, e.g. by test_infra_security
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _name(target: str) -> str:
    return Path(target).relative_to(REPO).as_posix() if target.endswith(".py") else target


def test_every_console_script_is_an_entry_point_found_here():
    """The walk below covers pyproject's scripts: a console script's module runs as a program too."""
    assert set(console_scripts()) <= {target for target, _ in entry_points()}
    assert len(entry_points()) >= 20


@pytest.mark.parametrize(("target", "prog"), entry_points(), ids=[_name(target) for target, _ in entry_points()])
def test_entry_point_parser_has_its_prog_and_help_on_every_option(target: str, prog: str):
    module = load(target)
    assert "ArgumentParser(" not in inspect.getsource(module.main), "main builds its parser with build_parser()"
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    assert parser.prog == prog
    assert parser.description, "a description for --help"
    for action in parser._actions:
        option = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{option} has no help"
        if action.help == argparse.SUPPRESS:
            assert (_name(target), option) in HIDDEN, f"{option} is hidden from --help"
        assert "--input" not in action.option_strings or action.help == argparse.SUPPRESS, "the spelling is --inputs"


@pytest.mark.parametrize("module", ["components.predict", "flows.predict"])
def test_both_predict_commands_take_inputs(module: str):
    args = load(module).build_parser().parse_args(["--model", "models:/m@champion", "--inputs", "in", "--out", "o"])
    assert args.inputs == "in"


def test_the_old_input_spelling_still_works_with_a_notice_and_is_not_in_help(capsys: pytest.CaptureFixture[str]):
    parser = load("components.predict").build_parser()
    args = parser.parse_args(["--model", "models:/m@champion", "--input", "photos", "--out", "o"])
    assert args.inputs == "photos"
    assert "--input is deprecated, use --inputs" in capsys.readouterr().err
    shown = parser.format_help()
    assert "--inputs DIR_OR_CSV" in shown and "--input " not in shown
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "models:/m@champion", "--out", "o"])
    assert "--inputs is required" in capsys.readouterr().err
