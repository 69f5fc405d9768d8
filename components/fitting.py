"""Training helpers shared by train_head and finetune: content keys, class weights, MLflow runs
with explicit run ids, per-epoch logging, history CSV and curve plots, the model-dir contract.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import runtime
from components.config import TrackingConfig
from components.registry import RetryPolicy, with_retries

HISTORY_COLUMNS = ["epoch", "accuracy", "val_accuracy", "loss", "val_loss"]
# Tries to reach MLflow before training starts: about 6 s of backoff, then the stage stops.
START_POLICY = RetryPolicy(attempts=3, first_wait_s=2.0)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_version(manifest: str | Path) -> str:
    """The manifest's content hash: it lists every image's sha256, so it names the data exactly."""
    return file_sha256(manifest)[:16]


def content_key(parts: dict[str, Any]) -> str:
    """A short stable hash of everything that determines an artifact (cache and checkpoint names)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def weights_identity(weights: str) -> str:
    """'imagenet'/'none' as is; a weights file by content, so replacing the file changes the key."""
    path = Path(weights)
    return f"file:{file_sha256(path)}" if weights not in ("imagenet", "none") and path.is_file() else weights


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """'balanced': n / (k * count_c), so each class weighs the same in the loss; None otherwise."""
    if mode != "balanced":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}


def progress_verbosity() -> int:
    """Keras progress bars on a terminal; one line per epoch in logs (dvc, Prefect)."""
    return 1 if sys.stdout.isatty() else 2


# --- MLflow, with the run id passed explicitly (the active run is process-global) ----------------

def start_run(tracking: TrackingConfig, stage: str, tags: dict[str, str] | None = None,
              run_id: str | None = None) -> tuple[Any, str, str]:
    """(client, run_id, experiment_id); reopens `run_id` when resuming an interrupted run."""
    from mlflow import MlflowClient

    from components.tracking import setup_mlflow

    # Fail before any training when the server is down (TrackingUnavailable names it, redacted).
    experiment_id = with_retries("reach the tracking server", setup_mlflow, tracking, policy=START_POLICY)
    client = MlflowClient()
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return client, run_id, experiment_id
    run = client.create_run(experiment_id, run_name=stage, tags={"stage": stage, **(tags or {})})
    return client, run.info.run_id, experiment_id


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(flat), 100):
        client.log_batch(run_id, params=flat[i:i + 100])


def mlflow_epoch_logger(client: Any, run_id: str, first_epoch: int = 1) -> Any:
    """A Keras callback logging every epoch's metrics with step = epoch (1-based)."""
    import keras
    from mlflow.entities import Metric

    class _Logger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            import time

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, epoch + first_epoch) for k, v in (logs or {}).items()
                       if np.isscalar(v) or getattr(v, "shape", None) == ()]
            client.log_batch(run_id, metrics=metrics)

    return _Logger()


# --- history and curves ----------------------------------------------------------------------------

def history_frame(history: dict[str, list[float]], first_epoch: int = 1) -> pd.DataFrame:
    epochs = len(next(iter(history.values()), []))
    frame = pd.DataFrame({"epoch": range(first_epoch, first_epoch + epochs)})
    for column in HISTORY_COLUMNS[1:]:
        frame[column] = history.get(column, [np.nan] * epochs)
    return frame


def plot_curves(history: pd.DataFrame, title: str, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.plot(history["epoch"], history[metric], marker="o", label=f"train {metric}")
        ax.plot(history["epoch"], history[f"val_{metric}"], marker="o", label=f"val {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with runtime.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def write_reports(history: pd.DataFrame, report_dir: str | Path, title: str) -> tuple[Path, Path]:
    """history.csv (epoch, accuracy, val_accuracy, loss, val_loss) and curves.png."""
    report_dir = Path(report_dir)
    csv_path, png_path = report_dir / "history.csv", report_dir / "curves.png"
    with runtime.atomic_file(csv_path) as fh:
        history[HISTORY_COLUMNS].to_csv(fh, index=False)
    plot_curves(history, title, png_path)
    return csv_path, png_path


def best_epoch(history: pd.DataFrame) -> pd.Series:
    """The row early stopping restored: lowest val_loss (first one on ties)."""
    return history.loc[history["val_loss"].idxmin()]


def save_model_dir(model: Any, classes: list[str], run_info: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the model-dir contract atomically: model.keras, classes.json, run.json."""
    with runtime.atomic_dir(out_dir) as tmp:
        model.save(tmp / "model.keras")
        runtime.write_json(tmp / "classes.json", list(classes))
        runtime.write_json(tmp / "run.json", run_info)
    return Path(out_dir)
