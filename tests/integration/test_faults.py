"""Faults injected into the real stage processes: full and read-only disks, SIGKILL mid-copy.

Every test starts the real CLI (`python -m components.<stage>`, or `dvc repro`) as a subprocess.
Disk faults are real, not mocked: a tiny tmpfs (full after a few KiB) or a read-only tmpfs mounted
in a private mount namespace (`unshare -m`, needs root or CAP_SYS_ADMIN; skipped elsewhere), and
an output path under a regular file (works anywhere).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from benchmarks.workspace import REPO, tool_env
from components.ingest import CACHE_DIRNAME
from tests.datakit import make_classes, tree_digest
from tests.evalkit import make_model_dir, write_manifest

pytestmark = pytest.mark.slow
PYTHON = sys.executable
# Smaller than the flow tests' settings: these tests need stages that run, not models that learn. Keras
# runs the frozen passes: exporting each model to ONNX costs more than it saves on 24 images (the ONNX
# path is the flow tests' default and has its own tests).
FAULT_SETTINGS = {
    "model": {"alpha": 0.35, "image_size": 64},
    "train_head": {"epochs": 3, "early_stopping_patience": 2, "feature_engine": "keras", "min_epoch_steps": 1},
    "evaluate": {"inference_engine": "keras"},
}


def stage_env(**extra: str) -> dict[str, str]:
    env = tool_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the workspace's own sqlite store unless a test says otherwise
    return {**env, **extra}


def write_params(path: Path, **sections: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --- real disk faults ----------------------------------------------------------------------------


@functools.cache
def can_mount_private_tmpfs() -> bool:
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    with tempfile.TemporaryDirectory() as mnt:
        probe = subprocess.run(
            [unshare, "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", mnt],
            capture_output=True,
        )
    return probe.returncode == 0


def run_on_small_disk(
    cmd: list[str], mount: Path, *, size: str = "16k", read_only: bool = False, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` with a fresh tmpfs of `size` (or a read-only one) mounted at `mount`, for it alone."""
    if not can_mount_private_tmpfs():
        pytest.skip("cannot mount a private tmpfs here (needs root / CAP_SYS_ADMIN and unshare)")
    mount.mkdir(parents=True, exist_ok=True)
    options = f"{'ro,' if read_only else ''}size={size}"
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", options, str(mount), *cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], expected: str) -> str:
    """Exit 2, the expected message as the last stderr line, and no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(expected, last), last
    return last


@pytest.fixture(scope="module")
def ingest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ingest_disk")
    make_classes(root / "source", {"alpha": 30, "beta": 30})
    write_params(root / "params.yaml", ingest={"source": str(root / "source"), "workers": 1})
    return root


def ingest_cmd(
    raw: str = "data/raw", manifest: str = "data/manifest.csv", report: str = "reports/ingest.json"
) -> list[str]:
    return [
        PYTHON,
        "-m",
        "components.ingest",
        "--params",
        "params.yaml",
        "--raw-dir",
        raw,
        "--manifest",
        manifest,
        "--report",
        report,
    ]


def test_ingest_onto_a_full_disk_says_which_output_and_why(ingest_dir: Path) -> None:
    full = ingest_dir / "full"
    proc = run_on_small_disk(
        ingest_cmd(raw=f"{full}/raw", manifest=f"{full}/manifest.csv"),
        full,
        size="16k",
        cwd=ingest_dir,
        env=stage_env(),
    )
    assert_one_line_error(
        proc,
        rf"ingest: error: cannot write {re.escape(str(full))}/raw/\S+: "
        r"no space left on device \(free some space, then rerun\)",
    )
    assert not (ingest_dir / "reports" / "ingest.json").exists()


def test_ingest_onto_a_read_only_file_system_fails_before_copying(ingest_dir: Path) -> None:
    read_only = ingest_dir / "ro"
    proc = run_on_small_disk(
        ingest_cmd(manifest=f"{read_only}/manifest.csv"), read_only, read_only=True, cwd=ingest_dir, env=stage_env()
    )
    assert_one_line_error(
        proc,
        rf"ingest: error: cannot write {re.escape(str(read_only))}/manifest.csv: "
        r"read-only file system \(choose a writable location\)",
    )
    assert not (ingest_dir / "data" / "raw").exists()  # nothing copied before the check


def test_ingest_report_under_a_regular_file_is_explained(ingest_dir: Path) -> None:
    (ingest_dir / "blocker").write_text("a file, not a folder")
    proc = subprocess.run(
        ingest_cmd(raw="out/raw", manifest="out/manifest.csv", report="blocker/sub/ingest.json"),
        cwd=ingest_dir,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_one_line_error(
        proc,
        rf"ingest: error: cannot access {re.escape(str(Path('blocker/sub')))}: "
        r"a parent of this path is a file, not a folder",
    )


@pytest.fixture(scope="module")
def evaluate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate_disk")
    write_manifest(root)
    make_model_dir(root / "model")
    write_params(root / "params.yaml", evaluate={"batch_size": 8, "worst_examples": 2})
    return root


def evaluate_cmd(report_dir: str, metrics: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "components.evaluate",
        "--params",
        "params.yaml",
        "--manifest",
        "validated.csv",
        "--model-dir",
        "model",
        "--report-dir",
        report_dir,
        "--metrics",
        metrics,
    ]


def test_evaluate_onto_a_full_disk_fails_before_registering_anything(evaluate_dir: Path) -> None:
    full = evaluate_dir / "full"
    env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{evaluate_dir}/mlflow.db")
    proc = run_on_small_disk(
        evaluate_cmd(f"{full}/reports", f"{full}/metrics.json"), full, size="8k", cwd=evaluate_dir, env=env
    )
    assert_one_line_error(
        proc,
        rf"evaluate: error: cannot write {re.escape(str(full))}/reports(/\S+)?: "
        r"no space left on device \(free some space, then rerun\)",
    )
    assert not (evaluate_dir / "mlflow.db").exists()  # no run, no version: the rerun starts clean


def test_evaluate_metrics_under_a_regular_file_fails_before_scoring(evaluate_dir: Path) -> None:
    (evaluate_dir / "blocker").write_text("a file")
    env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{evaluate_dir}/mlflow.db")
    proc = subprocess.run(
        evaluate_cmd("reports", "blocker/metrics.json"),
        cwd=evaluate_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_one_line_error(
        proc, r"evaluate: error: cannot write under blocker: it is a file, and a folder is needed there"
    )
    assert "test accuracy" not in proc.stdout
    assert not (evaluate_dir / "mlflow.db").exists()


# --- SIGKILL mid-stage ---------------------------------------------------------------------------


def start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=cwd, env=stage_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, timeout_s: float = 300) -> None:
    """SIGKILL the process group as soon as `ready()` is true; fail if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, f"the stage ended (exit {proc.returncode}) before it could be killed mid-way"
        assert time.monotonic() < deadline, "no sign of progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ingest_killed_mid_copy_keeps_the_previous_complete_version(tmp_path: Path) -> None:
    source = make_classes(tmp_path / "source", {"alpha": 150, "beta": 150})
    write_params(tmp_path / "params.yaml", ingest={"source": str(source), "workers": 1})
    first = subprocess.run(ingest_cmd(), cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    manifest, raw = tmp_path / "data" / "manifest.csv", tmp_path / "data" / "raw"
    before = (sha256(manifest), tree_digest(raw), sha256(tmp_path / "reports" / "ingest.json"))
    make_classes(source, {"alpha": 0, "beta": 0, "gamma": 200}, start_seed=50_000)  # a new class arrives

    proc = start(ingest_cmd(), tmp_path, tmp_path / "killed.log")

    def partial() -> list[Path]:
        return [f for d in (tmp_path / "data").glob(".raw.tmp-*") for f in d.rglob("*.jpg")]

    kill_when(proc, lambda: len(partial()) >= 20)

    assert (sha256(manifest), tree_digest(raw), sha256(tmp_path / "reports" / "ingest.json")) == before
    rerun = subprocess.run(ingest_cmd(), cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert pd.read_csv(manifest)["label"].value_counts().to_dict() == {"alpha": 150, "beta": 150, "gamma": 200}
    assert [p.name for p in (tmp_path / "data").iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    assert list((tmp_path / "data").glob(f"{CACHE_DIRNAME}/staging-*")) == []  # the killed run's scratch, swept


def runs_named(ws: Path, name: str) -> int:
    db = ws / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return conn.execute("select count(*) from runs where name = ?", (name,)).fetchone()[0]
        except sqlite3.OperationalError:  # mid-migration or locked: not yet
            return 0
