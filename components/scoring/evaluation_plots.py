"""The evaluate stage's pictures: confusion matrix, reliability diagram, most confident mistakes; and the
per-image predictions table `dvc plots` draws its own confusion matrix from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.core import figures, files
from components.ingestion.images import ImageLimits
from components.modeling.data import Split, load_rgb
from components.modeling.metrics import predictions

# The figures evaluate writes into its report folder (also logged to MLflow as images).
FIGURES = ("confusion_matrix.png", "reliability.png", "worst_errors.png")
NO_PREDICTION = "(no prediction)"  # a row whose outputs were NaN/inf: counted as wrong, shown as such
# Class names come from the source: drawn as plain text, so a '$' in one is not matplotlib mathtext (or LaTeX).
PLAIN_TEXT = {"parse_math": False, "usetex": False}


def write_predictions(split: Split, probs: np.ndarray, path: str | Path) -> None:
    """path,actual,predicted,probability per test image (atomic), for DVC's confusion template."""
    predicted = predictions(probs)
    rows = np.arange(len(predicted))
    top = np.where(predicted >= 0, np.asarray(probs, dtype=np.float64)[rows, np.maximum(predicted, 0)], np.nan)
    table = pd.DataFrame(
        {
            "path": split.paths,
            "actual": [split.classes[i] for i in split.labels],
            "predicted": [split.classes[i] if i >= 0 else NO_PREDICTION for i in predicted],
            "probability": np.round(top, 6),
        }
    )
    files.write_csv(table, path)  # labels and paths come from the source: no cell starts a formula


def plot_confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = figures.pyplot()
    side = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_pred,
        labels=list(range(len(classes))),
        display_labels=classes,
        ax=ax,
        cmap="Blues",
        colorbar=False,
        xticks_rotation=45,
    )
    for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        label.set(**PLAIN_TEXT)
    ax.set_title(f"Test confusion matrix (n={len(y_true)})")
    figures.save_png(fig, path, dpi=120)


def plot_reliability(bins: pd.DataFrame, ece: float, path: Path) -> None:
    plt = figures.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    centers = (bins["low"] + bins["high"]) / 2
    width = float(bins["high"].iloc[0] - bins["low"].iloc[0])
    top.bar(centers, bins["accuracy"].fillna(0), width=width * 0.95, edgecolor="black", label="accuracy in bin")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability (top-label), ECE = {ece:.3f}")
    top.legend(loc="upper left")
    bottom.bar(centers, bins["count"], width=width * 0.95, color="gray")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    figures.save_png(fig, path, dpi=120)


def plot_worst_errors(split: Split, probs: np.ndarray, count: int, path: Path, limits: ImageLimits) -> int:
    """The most confident mistakes, with true and predicted labels; returns how many are shown."""
    plt = figures.pyplot()
    y_pred = predictions(probs)
    wrong = np.flatnonzero((y_pred != split.labels) & (y_pred >= 0))
    worst = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:count]
    cols = max(1, min(4, len(worst)))
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(load_rgb(split.paths[i], 160, limits))
        ax.set_title(
            f"true: {split.classes[split.labels[i]]}\npred: {split.classes[y_pred[i]]} ({probs[i, y_pred[i]]:.2f})",
            fontsize=9,
            **PLAIN_TEXT,
        )
    if not len(worst):
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle("Most confident test mistakes")
    figures.save_png(fig, path, dpi=100)
    return int(len(worst))
