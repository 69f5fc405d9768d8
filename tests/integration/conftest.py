"""A throwaway DVC workspace (its own git repository) holding a copy of the project and tiny settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import FLOWERS, REPO, copy_subset

PROJECT_FILES = ["components", "flows", "dvc.yaml", "params.yaml", "pyproject.toml"]

# Small enough to train in about a minute on 2 cores, real enough to learn something.
TINY_SETTINGS = {
    "model": {"alpha": 0.35, "image_size": 64},
    "ingest": {"split": {"train": 0.6, "val": 0.2, "test": 0.2}},
    "validate": {"min_images_per_class": 3, "max_bad_fraction": 0.2},
    "augment": {"preview_images": 4},
    "train_head": {"epochs": 3, "batch_size": 16, "augmented_copies": 1, "early_stopping_patience": 2},
    "finetune": {"epochs": 1, "batch_size": 16, "unfreeze_layers": 10, "warmup_epochs": 0},
    "evaluate": {"batch_size": 16, "worst_examples": 4, "promotion": {"min_accuracy": 0.0}},
}


def deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def git(workdir: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workdir, check=True, capture_output=True, text=True).stdout


def dvc(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=workdir, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_workspace(root: Path, source: Path, **settings: dict) -> Path:
    """Copy the project into `root`, make it a git + DVC repository, write tiny params pointing at `source`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    shutil.copy2(REPO / ".gitignore", root / ".gitignore")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(params, TINY_SETTINGS)
    deep_update(params, settings)
    params["ingest"]["source"] = str(source)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "test")
    dvc(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "workspace")
    return root


@pytest.fixture(scope="module")
def flowers_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} not found (set TP_SHARED_DIR)")
    root = tmp_path_factory.mktemp("flowers_source")
    for name in ["daisy", "sunflowers"]:
        copy_subset(FLOWERS / name, root / name, 20)
    return root
