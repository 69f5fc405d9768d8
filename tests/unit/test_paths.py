"""One table of hand-off paths: dvc.yaml's commands, deps and outs agree with components/core/paths.py."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from components.core import paths

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def command_flags(stage: str) -> dict[str, str]:
    words = shlex.split(DVC[stage]["cmd"])
    return {word[2:].replace("-", "_"): value for word, value in zip(words, words[1:]) if word.startswith("--")}


def declared(stage: str, *kinds: str) -> set[PurePosixPath]:
    entries = [entry for kind in kinds for entry in DVC[stage].get(kind, [])]
    names = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]
    return {PurePosixPath(name) for name in names}


def covered(path: Path, entries: set[PurePosixPath]) -> bool:
    """The path itself or a folder above it is declared (a folder out covers its files)."""
    path = PurePosixPath(path.as_posix())
    return any(path == entry or entry in path.parents for entry in entries)


def holds_outputs(folder: Path, entries: set[PurePosixPath]) -> bool:
    """A report folder whose tracked files are declared one by one (its pictures go to MLflow, not DVC)."""
    return any(PurePosixPath(folder.as_posix()) in entry.parents for entry in entries)


def test_every_dvc_stage_has_a_paths_model():
    assert set(paths.STAGE_PATHS) == set(DVC)


@pytest.mark.parametrize("stage", list(paths.STAGE_PATHS))
def test_the_command_passes_every_path_with_the_tables_default(stage):
    model = paths.STAGE_PATHS[stage]
    flags = command_flags(stage)
    for name, field in model.model_fields.items():
        if name in model.UNTRACKED:
            continue
        assert name in flags, f"dvc.yaml's {stage} cmd lacks --{name.replace('_', '-')}"
        assert Path(flags[name]) == field.default, f"{stage} --{name}: dvc.yaml says {flags[name]}"


@pytest.mark.parametrize("stage", list(paths.STAGE_PATHS))
def test_reads_are_deps_and_writes_are_outputs(stage):
    model = paths.STAGE_PATHS[stage]
    assert set(model.INPUTS) | set(model.OUTPUTS) | set(model.UNTRACKED) == set(model.model_fields)
    deps, outs = declared(stage, "deps"), declared(stage, "outs", "metrics", "plots")
    for name in model.INPUTS:
        assert covered(model.model_fields[name].default, deps), f"{stage} reads {name} but dvc.yaml lacks it in deps"
    for name in model.OUTPUTS:
        written = model.model_fields[name].default
        assert covered(written, outs) or holds_outputs(written, outs), f"{stage} writes {name}: no DVC output there"


def test_the_check_catches_a_read_missing_from_deps():
    """The coverage rule itself: a file is covered by its folder, not by a sibling or a prefix of its name."""
    deps = {PurePosixPath("models/head"), PurePosixPath("data/validated.csv")}
    assert covered(Path("models/head/run.json"), deps)
    assert not covered(Path("models/headless.json"), deps)
    assert not covered(Path("reports/ingest.json"), deps)
    assert holds_outputs(Path("models"), deps) and not holds_outputs(Path("data/raw"), deps)


def test_cli_flags_come_from_the_table_and_parse_back():
    parser = argparse.ArgumentParser()
    paths.EvaluatePaths.add_arguments(parser)
    parsed = paths.EvaluatePaths.from_args(parser.parse_args(["--model-dir", "elsewhere/model"]))
    assert parsed.model_dir == Path("elsewhere/model")
    assert parsed.suspects == paths.SUSPECT_LABELS
    assert parsed.under("/ws").manifest == Path("/ws/data/validated.csv")
