"""Baseline "linear probe": multinomial logistic regression on a frozen backbone's pooled features.

The backbone, width, input size and pooling are the pipeline's (params.yaml `model`, `train_head.pooling`),
ImageNet weights from $KERAS_HOME/models; each image is seen once, un-augmented, decoded as evaluate does.
The inverse regularisation strength C is chosen on val (accuracy, then log-loss); test only scores the
chosen model. Its "best at any setting" (the best test accuracy over the C grid) is reported next to the
other methods' best-at-any-epoch, and like theirs it is chosen on test: a ceiling, not a result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 11))  # 0.001 .. 100, half a decade apart


def fit_probe(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], grid: tuple[float, ...] = C_GRID
) -> tuple[int, list[Any], list[dict[str, float]]]:
    """(index of the C best on val, a model per C, a row per C: val accuracy and log-loss). Features are
    standardised on train; nothing here sees test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_val, y_val) = train, val
    labels = np.unique(np.concatenate([y_train, y_val]))
    table, models = [], []
    for c in grid:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x_train, y_train)
        probs = model.predict_proba(x_val)
        table.append(
            {
                "C": round(c, 6),
                "val_accuracy": round(float((model.classes_[probs.argmax(1)] == y_val).mean()), 4),
                "val_log_loss": round(float(log_loss(y_val, probs, labels=labels)), 4),
            }
        )
        models.append(model)
    best = min(range(len(grid)), key=lambda i: (-table[i]["val_accuracy"], table[i]["val_log_loss"]))
    return best, models, table


def run_linear_probe(workspace: Path, model_cfg: Any, head_cfg: Any) -> dict[str, Any]:
    """Features of the validated manifest's splits, the probe fitted on train, C chosen on val, scored on
    test. Seconds: the train/val feature pass and the fits (like the other baselines, testing is left out)."""
    import pandas as pd

    from benchmarks.run import split_arrays
    from components.modeling.backbones import build_classifier, feature_extractor
    from components.modeling.data import class_names

    started = time.monotonic()
    classes = class_names(pd.read_csv(workspace / "data/validated.csv", keep_default_na=False))
    extractor = feature_extractor(build_classifier(model_cfg, len(classes), head_cfg)[0])

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = split_arrays(workspace, split, classes, model_cfg.image_size)
        return extractor.predict(images, batch_size=32, verbose=0), labels

    best, models, table = fit_probe(features("train"), features("val"))
    seconds = time.monotonic() - started
    x_test, y_test = features("test")
    for row, model in zip(table, models, strict=True):  # every C scored for the report; chosen only on val
        row["test_accuracy"] = round(float((model.predict(x_test) == y_test).mean()), 4)
    accuracy = float((models[best].predict(x_test) == y_test).mean())
    print(f"probe C={table[best]['C']:g} (chosen on val): test accuracy {accuracy:.4f}", flush=True)
    return {
        "total_seconds": round(seconds, 1),
        "test_accuracy_final": accuracy,
        "best_test_accuracy": max(row["test_accuracy"] for row in table),
        "chosen_C": table[best]["C"],
        "grid": table,
    }
