"""Training history shared by train_head and finetune: the per-epoch table, the best epoch, curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components import files

HISTORY_COLUMNS = ["epoch", "accuracy", "val_accuracy", "loss", "val_loss"]


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
    with files.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


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
