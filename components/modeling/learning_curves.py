"""Training history shared by train_head and finetune: the per-epoch table, the best epoch, curves (also in MLflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core import figures, files, tracking

HISTORY_COLUMNS = ["epoch", "accuracy", "val_accuracy", "loss", "val_loss"]


def history_frame(history: dict[str, list[float]], first_epoch: int = 1) -> pd.DataFrame:
    epochs = len(next(iter(history.values()), []))
    frame = pd.DataFrame({"epoch": range(first_epoch, first_epoch + epochs)})
    for column in HISTORY_COLUMNS[1:]:
        frame[column] = history.get(column, [np.nan] * epochs)
    return frame


def plot_curves(history: pd.DataFrame, title: str, path: str | Path) -> None:
    fig, (ax_acc, ax_loss) = figures.pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.plot(history["epoch"], history[metric], marker="o", label=f"train {metric}")
        ax.plot(history["epoch"], history[f"val_{metric}"], marker="o", label=f"val {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    figures.save_png(fig, path, dpi=100)


def write_reports(history: pd.DataFrame, report_dir: str | Path, title: str) -> tuple[Path, Path]:
    """history.csv (epoch, accuracy, val_accuracy, loss, val_loss) and curves.png."""
    report_dir = Path(report_dir)
    csv_path, png_path = report_dir / "history.csv", report_dir / "curves.png"
    files.write_csv(history[HISTORY_COLUMNS], csv_path)
    plot_curves(history, title, png_path)
    return csv_path, png_path


def best_epoch(history: pd.DataFrame) -> pd.Series:
    """The row early stopping restored: lowest val_loss (first one on ties)."""
    return history.loc[history["val_loss"].idxmin()]


def report(client: Any, run_id: str, history: pd.DataFrame, report_dir: str | Path, stage: str, title: str) -> None:
    """history.csv and curves.png under report_dir, both logged to the stage's MLflow run."""
    csv_path, png_path = write_reports(history, report_dir, f"{stage}: {title}")
    client.log_artifact(run_id, str(csv_path))
    tracking.log_picture(client, run_id, png_path, f"{stage}/curves.png")
