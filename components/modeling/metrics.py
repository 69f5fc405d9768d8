"""Test-set metrics from class probabilities: overall, per class, calibration (ECE) and top-k.

Pure functions of (true labels, probabilities, class names): evaluate scores the challenger with
them and the promotion gate re-scores the champion with the same ones, so the two are comparable.
Non-finite probabilities (NaN/inf) are counted, never silently turned into a prediction.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd


def non_finite_rows(probs: np.ndarray) -> int:
    """How many rows hold a NaN or an infinity (a model that produces them must not be promoted)."""
    probs = np.asarray(probs, dtype=np.float64)
    return int((~np.isfinite(probs)).any(axis=1).sum()) if probs.size else 0


def predictions(probs: np.ndarray) -> np.ndarray:
    """argmax per row; a row with any non-finite value predicts -1 (wrong for every label)."""
    probs = np.asarray(probs, dtype=np.float64)
    finite = np.isfinite(probs).all(axis=1)
    return np.where(finite, np.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0).argmax(axis=1), -1)


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Recall of each class (0.0 for a class with no test images, as scikit-learn's zero_division=0)."""
    from sklearn.metrics import recall_score

    recall = recall_score(y_true, y_pred, labels=list(range(len(classes))), average=None, zero_division=0)
    return {name: float(r) for name, r in zip(classes, recall)}


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Per equal-width confidence bin: count, mean confidence, accuracy (top-label calibration)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = index == b
        rows.append(
            {
                "low": edges[b],
                "high": edges[b + 1],
                "count": int(mask.sum()),
                "confidence": float(confidence[mask].mean()) if mask.any() else np.nan,
                "accuracy": float(correct[mask].mean()) if mask.any() else np.nan,
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(table: pd.DataFrame) -> float:
    filled = table[table["count"] > 0]
    total = filled["count"].sum()
    return float((filled["count"] / total * (filled["accuracy"] - filled["confidence"]).abs()).sum()) if total else 0.0


def top_label_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """ECE of top-label predictions from their confidences and whether each was right."""
    return expected_calibration_error(calibration_bins(np.asarray(confidence), np.asarray(correct), n_bins))


def ece_sampling(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10, draws: int = 1000, seed: int = 0
) -> dict[str, float]:
    """How far a binned ECE on this few images is from the truth: a 95% bootstrap interval of it (images
    resampled), and `floor`, the mean ECE a perfectly calibrated model with these confidences would show on
    as many images (each right with probability equal to its confidence). On 153 images at 94% accuracy the
    floor is about 0.028, so an ECE there says little below that."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    rng, n = np.random.default_rng(seed), len(confidence)
    resampled = [top_label_ece(confidence[rows], correct[rows], n_bins) for rows in rng.integers(0, n, (draws, n))]
    floor = [top_label_ece(confidence, rng.random(n) < confidence, n_bins) for _ in range(draws)]
    low, high = np.quantile(resampled, [0.025, 0.975]) if n else (0.0, 0.0)
    return {"low": float(low), "high": float(high), "floor": float(np.mean(floor)) if n else 0.0}


def compute_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], *, calibration_bins_count: int = 10, top_k: int = 3
) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1, top-k (> 5 classes), ECE, non-finite rows.

    Rows with NaN/inf count as wrong and are left out of calibration (they have no confidence).
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(classes)))
    y_pred = predictions(probs)
    finite = y_pred >= 0
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    bins = calibration_bins(
        probs[finite].max(axis=1) if finite.any() else np.zeros(0), (y_pred == y_true)[finite], calibration_bins_count
    )
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "min_class_recall": float(recall.min()),
        "ece": expected_calibration_error(bins),
        "n_test": int(len(y_true)),
        "non_finite_rows": int((~finite).sum()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "calibration": bins.to_dict(orient="records"),
    }
    if len(classes) > 5 and top_k < len(classes):
        # A row's top k by probability; a non-finite row is never a hit.
        ranks = np.argsort(-np.nan_to_num(probs, nan=-1.0, posinf=-1.0, neginf=-1.0), axis=1, kind="stable")[:, :top_k]
        metrics[f"top_{top_k}_accuracy"] = float(((ranks == y_true[:, None]).any(axis=1) & finite).mean())
    return metrics


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """One level, for `dvc metrics show` and MLflow: headline numbers plus recall_<class> etc."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, values in metrics["per_class"].items():
        for key in ("recall", "precision", "f1"):
            flat[f"{key}_{name}"] = values[key]
    return flat


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts (class names may hold any character)."""
    return re.sub(r"[^\w\-. /]", "_", name)


def align_columns(probs: np.ndarray, their_classes: list[str], our_classes: list[str]) -> np.ndarray:
    """Reorder another model's probability columns into our class order (same class set required)."""
    if sorted(their_classes) != sorted(our_classes) or len(set(their_classes)) != len(their_classes):
        raise ValueError(f"class sets differ: {their_classes} vs {our_classes}")
    return np.asarray(probs)[:, [their_classes.index(c) for c in our_classes]]
