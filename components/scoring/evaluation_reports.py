"""What evaluate reports about the test split: its report folder's figures and tables, suspect labels left out.

The headline metrics are on every test image. With train_head's suspect-label report, accuracy is also
reported without the test images it flags (`accuracy_without_suspects`, listed in test_suspects.csv):
reported only, never used by the gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core import files
from components.core.contracts import ModelRunInfo
from components.ingestion.images import ImageLimits
from components.modeling.data import Split
from components.modeling.metrics import predictions
from components.quality import label_issues
from components.scoring.evaluation_plots import plot_confusion_matrix, plot_reliability, plot_worst_errors

TEST_SUSPECTS_FILE = "test_suspects.csv"


def test_suspects(
    suspects_path: str | Path | None, head_info: ModelRunInfo | None, split: Split, y_pred: np.ndarray
) -> tuple[dict[str, float], pd.DataFrame | None]:
    """Accuracy on the test images not flagged as suspect labels, and the flagged ones (None: not checked).

    Checked means the report lists a split column and, where the head's run.json is at hand, that the
    head's check covered the test split (a header-only report from a skipped check is not "none found")."""
    suspects = label_issues.suspects_of(suspects_path, "test") if suspects_path else None
    if suspects is None or (head_info is not None and "test" not in (head_info.suspect_label_splits or [])):
        return {}, None
    flagged = np.isin(np.asarray(split.paths, dtype=object), np.asarray(suspects, dtype=object))
    correct = y_pred == split.labels
    numbers: dict[str, float] = {"n_test_suspects": int(flagged.sum())}
    if (~flagged).any():
        numbers["accuracy_without_suspects"] = float(correct[~flagged].mean())
    rows = np.flatnonzero(flagged)
    left_out = pd.DataFrame(
        {
            "path": [split.paths[i] for i in rows],
            "given_label": [split.classes[split.labels[i]] for i in rows],
            "predicted": [split.classes[y_pred[i]] if y_pred[i] >= 0 else "" for i in rows],
        }
    )
    return numbers, left_out


def score_summary(metrics: dict[str, Any], left_out: pd.DataFrame | None, engine: str) -> str:
    """The test scores in a line (and a second for the suspect labels, where they were checked)."""
    summary = (
        f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
        f"ECE {metrics['ece']:.4f} on {metrics['n_test']} images (scored with {engine})"
    )
    if left_out is None:
        return summary
    without = metrics.get("accuracy_without_suspects")
    return f"{summary}\nsuspect test labels: {len(left_out)}; accuracy without them " + (
        f"{without:.4f}" if without is not None else "n/a (every test image is a suspect)"
    )


def write_reports(
    out: Path,
    split: Split,
    probs: np.ndarray,
    metrics: dict[str, Any],
    worst_examples: int,
    limits: ImageLimits,
    left_out: pd.DataFrame | None,
) -> None:
    """The figures, classification_report.txt, the full metrics.json and, where checked, test_suspects.csv."""
    from sklearn.metrics import classification_report

    y_pred = predictions(probs)
    plot_confusion_matrix(split.labels, np.where(y_pred >= 0, y_pred, 0), split.classes, out / "confusion_matrix.png")
    plot_reliability(pd.DataFrame(metrics["calibration"]), metrics["ece"], out / "reliability.png")
    plot_worst_errors(split, probs, worst_examples, out / "worst_errors.png", limits)
    (out / "classification_report.txt").write_text(
        classification_report(
            split.labels,
            y_pred,
            labels=list(range(len(split.classes))),
            target_names=split.classes,
            zero_division=0,
        )
    )
    files.write_json(out / "metrics.json", metrics)
    if left_out is not None:
        files.write_csv(left_out, out / TEST_SUSPECTS_FILE)
