"""A throwaway DVC workspace (its own git repository) holding a copy of the project.

Used by the integration tests and the benchmarks, so both run the pipeline exactly as a user's
clone would: `dvc.yaml` stages in a git repository, settings from its `params.yaml`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["components", "flows", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore"]


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def git(workdir: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workdir, check=True, capture_output=True, text=True).stdout


def tool_env() -> dict[str, str]:
    """This interpreter's scripts (dvc, python) first on PATH, as the stages expect."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def dvc(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=workdir, env=tool_env(), capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_workspace(root: Path, source: Path | str, settings: dict[str, Any] | None = None) -> Path:
    """Copy the project into `root`, make it a git + DVC repository, set params (source + `settings`)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copy2(src, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(params, settings or {})
    params["ingest"]["source"] = str(source)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "init", "-q")
    git(root, "config", "user.email", "bench@transfer-pipeline.local")
    git(root, "config", "user.name", "transfer-pipeline")
    dvc(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "workspace")
    return root
