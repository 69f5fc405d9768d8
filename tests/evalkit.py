"""Stand-ins for the training stages' outputs, for the evaluate/registry/predict/serving tests.

A model dir with the same contract as models/finetune (model.keras taking float32 RGB 0..255 and
carrying its own resizing and scaling, classes.json, run.json), whose weights are chosen so that
it classifies the colour-coded test images perfectly, or deliberately badly.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests

from tests.conftest import COLORS, write_image

CLASSES = ["alpha", "beta", "gamma"]


def write_manifest(root: Path, classes: list[str] = CLASSES, per_split: dict[str, int] | None = None) -> Path:
    """Colour-coded images per class and split (absolute paths) and a manifest CSV for them."""
    per_split = per_split or {"train": 3, "val": 2, "test": 4}
    rows = []
    for c, name in enumerate(classes):
        for split, count in per_split.items():
            for i in range(count):
                path = write_image(
                    root / "images" / name / f"{split}_{i}.jpg",
                    size=(40 + 8 * i, 36),
                    color=COLORS[c],
                    seed=100 * c + 10 * len(split) + i,
                )
                rows.append(
                    {
                        "path": str(path),
                        "label": name,
                        "split": split,
                        "sha256": "",
                        "bytes": path.stat().st_size,
                        "width": 40 + 8 * i,
                        "height": 36,
                        "format": "JPEG",
                        "mode": "RGB",
                        "source": str(path),
                        "error": "",
                    }
                )
    manifest = root / "validated.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def colour_kernel(n_classes: int, quality: str) -> np.ndarray:
    """Dense weights on mean (R, G, B) in 0..1: class c <- channel c. 'bad' confuses the last
    class with the first; 'awful' predicts every image as a different class than it is; 'nan'
    answers NaN for every image."""
    kernel = np.full((3, n_classes), -10.0, dtype=np.float32)
    for c in range(n_classes):
        kernel[c % 3, c] = 10.0
    if quality == "bad":
        kernel[:, -1], kernel[:, 0] = kernel[:, 0].copy(), kernel[:, -1].copy()
        kernel[:, -1] -= 1.0
    elif quality == "awful":
        kernel = np.roll(kernel, 1, axis=1)
    elif quality == "nan":
        kernel[:] = np.nan
    return kernel


def run_info(
    classes: list[str],
    run_id: str = "finetune-run",
    head_run_id: str = "head-run",
    image_size: int = 32,
    data_version: str = "data-v1",
) -> dict[str, Any]:
    """The run.json fields train_head/finetune write (contracts.ModelRunInfo), for a stand-in model."""
    return {
        "stage": "finetune",
        "run_id": run_id,
        "experiment_id": "0",
        "backbone": "tiny_colour",
        "alpha": None,
        "image_size": image_size,
        "weights": "none",
        "data_version": data_version,
        "best_epoch": 1,
        "epochs_run": 1,
        "val_accuracy": 1.0,
        "val_loss": 0.0,
        "seconds": 0.1,
        "device": {"kind": "cpu"},
        "settings": {"finetune": {"epochs": 1}},
        "head_run_id": head_run_id,
        "num_classes": len(classes),
    }


def make_model_dir(
    path: Path,
    classes: list[str] = CLASSES,
    quality: str = "good",
    run_id: str = "finetune-run",
    head_run_id: str = "head-run",
    image_size: int = 32,
    flip_tta: bool = False,
    crop_tta: bool = False,
) -> Path:
    """A tiny Keras model with the models/finetune contract (model_folder.save_model_dir), good or deliberately bad;
    with `flip_tta` (and `crop_tta`), wrapped as finetune saves a model that keeps test-time augmentation."""
    import keras

    from components.modeling.model_folder import save_model_dir

    inputs = keras.Input(shape=(None, None, 3))
    x = keras.layers.Resizing(image_size, image_size)(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(len(classes), activation="softmax")
    model = keras.Model(inputs, dense(x))
    dense.set_weights([colour_kernel(len(classes), quality), np.zeros(len(classes), dtype=np.float32)])
    if flip_tta or crop_tta:
        from components.modeling.backbones import with_flip_tta

        model = with_flip_tta(model, crop=crop_tta)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    return save_model_dir(model, classes, run_info(classes, run_id, head_run_id, image_size), path)


class ModelDirCopies:
    """`make_model_dir` for a whole test module: each (classes, quality) is built and saved once, and every
    caller gets its own copy of that folder, so the tests stay independent without rebuilding the model."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[tuple[str, ...], str], Path] = {}

    def __call__(self, path: Path, classes: list[str] = CLASSES, quality: str = "good") -> Path:
        import shutil

        key = (tuple(classes), quality)
        if key not in self.built:
            self.built[key] = make_model_dir(self.root / f"model-{len(self.built)}", classes, quality)
        if path.exists():  # as make_model_dir does: a second model in the same place replaces the first
            shutil.rmtree(path)
        shutil.copytree(self.built[key], path)
        return path


def empty_tracking_store(folder: Path) -> Path:
    """A SQLite tracking store with MLflow's tables already made: creating them takes seconds per new store
    (schema migrations), copying this file into a workspace as its mlflow.db takes milliseconds."""
    import contextlib

    from mlflow import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(folder):  # the store's Default experiment points here, never into the repository
        MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


_STORE_TEMPLATE: Path | None = None


def migrated_store(db: str | Path) -> str:
    """`sqlite:///<db>`, the file seeded (when new) with MLflow's tables from one store made per test process:
    a new store's schema migrations take seconds, copying the made one milliseconds."""
    global _STORE_TEMPLATE
    if _STORE_TEMPLATE is None:
        folder = Path(tempfile.mkdtemp(prefix="tp_store_template_"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _STORE_TEMPLATE = empty_tracking_store(folder)
    db = Path(db)
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_STORE_TEMPLATE, db)
    return f"sqlite:///{db}"


def write_stage_reports(
    ws: Path, quarantined: int = 3, data_version: str = "ingest-v1", validated_version: str = "validated-v1"
) -> None:
    """reports/ingest.json and reports/validation/summary.json as ingest and validate write them."""
    from components.core.contracts import IngestReport, ValidationCounts, ValidationSummary

    IngestReport(
        source="/data/src",
        source_kind="folder",
        layout="class_folders",
        raw_dir="data/raw",
        manifest="data/manifest.csv",
        data_version=data_version,
        files=40,
        images=40,
        unreadable=0,
        bytes=4000,
        counts={"train": {c: 3 for c in CLASSES}},
        class_folders={c: 13 for c in CLASSES},
        ignored=[],
        ignored_count=0,
        notes=[],
        seed=0,
        split_fractions={"train": 0.8, "val": 0.1, "test": 0.1},
        max_pixels=80_000_000,
        seconds=1.0,
        workers=1,
        cache={},
    ).write(ws / "reports" / "ingest.json")
    counts = ValidationCounts(
        files=40,
        valid=40 - quarantined,
        quarantined=quarantined,
        hidden_files=0,
        bad_files=quarantined,
        bad_fraction=quarantined / 40,
        per_class={c: 12 for c in CLASSES},
        per_split={"test": {c: 4 for c in CLASSES}},
    )
    ValidationSummary(
        passed=True,
        policy="quarantine",
        manifest="data/manifest.csv",
        data_version=data_version,
        validated_version=validated_version,
        counts=counts,
        problems=[],
        warnings=[],
        failures=[],
        settings={},
        ingest={},
        data_docs="",
    ).write(ws / "reports" / "validation" / "summary.json")


# --- servers on loopback (mlflow server, mlflow models serve) ------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


SERVER_STARTUP_S = 180  # ~35 s on an idle 2-core machine; much more when other work shares the cores


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on loopback with a SQLite store and proxied artifacts in `store`, once healthy."""
    import sys

    log = store / f"server-{time.monotonic_ns()}.log"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{store}/mlflow.db",
        "--artifacts-destination",
        str(store / "artifacts"),
        "--workers",
        "1",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=store, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", proc, log, SERVER_STARTUP_S)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
