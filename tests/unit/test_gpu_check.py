"""benchmarks/gpu_check.sh stays working between the sessions that get a GPU: its dry mode runs the
same driver here on CPU (TensorFlow backend for the reference, then JAX with TensorFlow made
unimportable, as on the GPU machine) and writes the same result files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.benchmark_check
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')")
def test_dry_run_fine_tunes_under_jax_and_checks_parity(tmp_path: Path, keras_home: Path) -> None:
    done = run_script(
        "--dry-run",
        "--out",
        str(tmp_path),
        env={"KERAS_HOME": os.environ.get("KERAS_HOME", str(keras_home)), "GPU_CHECK_WEIGHTS": "imagenet"},
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    reference = json.loads((tmp_path / "cpu_reference.json").read_text())
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert reference["backend"] == "tensorflow"
    assert result["backend"] == "jax" and not result["on_gpu"] and not result["tensorflow_imported"]
    assert (reference["replicas"], result["replicas"], result["data_parallel"]) == (1, 1, "one device")  # no GPUs here
    assert result["setup"]["trainable_backbone_layers"] > 0 and result["setup"]["train_images"] == 16
    assert len(result["finetune_epoch_seconds"]) == 2 and result["finetune_images_per_s"] > 0
    # Colour-coded classes on ImageNet features: both backends learn them, so parity is a real comparison.
    assert reference["val_accuracy"] >= 0.75 and result["val_accuracy"] >= 0.75
    parity = result["parity"]
    assert parity["reference_backend"] == "tensorflow"
    assert parity["abs_diff"] == pytest.approx(abs(result["val_accuracy"] - reference["val_accuracy"]), abs=1e-4)
    assert parity["ok"] == (parity["abs_diff"] <= parity["tolerance"])
    assert "skipped (dry run)" in done.stdout


def test_gpu_mode_refuses_clearly_without_a_gpu_or_its_carry(tmp_path: Path) -> None:
    done = run_script("--carry", str(tmp_path / "absent"), "--out", str(tmp_path / "out"))
    assert done.returncode == 3
    if shutil.which("nvidia-smi") is None:
        assert "no nvidia-smi here" in done.stderr
    else:
        assert "run --prepare" in done.stderr
    bad = run_script("--bogus")
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
