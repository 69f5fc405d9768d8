"""Logistic regression on standardised features, fitted and applied a chunk of rows at a time (issue 24).

The label-issue folds (components/quality/label_issues.py) fit one model per fold on the cached frozen
features. scikit-learn's `make_pipeline(StandardScaler(), LogisticRegression(C, tol, max_iter))` needs the
fold's rows in memory twice (the rows and their scaled copy: 1,280 float32 per image each), which grows with
the data set. This fits the same model, read from a row source (components/core/array_rows.py) `chunk`
rows at a time: the scaler's mean and population standard deviation (1 where it is ~0); the same objective,
mean cross-entropy + ||W||^2 / (2 C n) with the intercept not penalised (multinomial for 3+ classes, one
logistic for 2, as scikit-learn does); scipy's L-BFGS-B with scikit-learn's options. Probabilities agree with
scikit-learn's to rounding (tests/unit/test_label_issues.py compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from components.core.array_rows import StackedRows


@dataclass(frozen=True)
class StreamedLogistic:
    classes: np.ndarray  # the labels seen in the fit (the columns of `probabilities`, like sklearn's classes_)
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # (outputs, features + 1), the intercept last; outputs = 1 for two classes

    def probabilities(self, source: StackedRows, rows: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """(len(rows), len(classes)) class probabilities of those rows."""
        out = np.empty((len(rows), len(self.classes)), dtype=np.float64)
        for where, block in source.chunks(rows, chunk):
            out[where] = _probabilities(self._raw(block))
        return out

    def _raw(self, block: np.ndarray) -> np.ndarray:
        scaled = _scaled(block, self.mean, self.scale)
        coef, intercept = _weights_as(self.weights, scaled.dtype)
        return (scaled @ coef.T + intercept).astype(np.float64)


def _scaled(block: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """StandardScaler's transform of one chunk (a fresh copy: changed in place), in its float dtype as
    scikit-learn keeps it (float32 features stay float32)."""
    scaled = block if block.dtype in (np.float32, np.float64) else block.astype(np.float64)
    scaled -= mean.astype(scaled.dtype)  # one dtype: numpy's fast loop, not a casting one
    scaled /= scale.astype(scaled.dtype)
    return scaled


def _weights_as(weights: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(coef, intercept) in the features' dtype, contiguous (BLAS), as scikit-learn's loss casts them."""
    return np.ascontiguousarray(weights[:, :-1], dtype=dtype), weights[:, -1].astype(dtype)


def _probabilities(raw: np.ndarray) -> np.ndarray:
    if raw.shape[1] == 1:  # two classes: one logistic, P(second class) = sigmoid
        positive = expit(raw[:, 0])
        return np.stack([1.0 - positive, positive], axis=1)
    shifted = raw - raw.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _scaler(source: StackedRows, rows: np.ndarray, chunk: int | None) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's mean and scale, in two passes (float64 sums)."""
    total = np.zeros(source.shape[1])
    for _, block in source.chunks(rows, chunk):
        total += block.sum(axis=0, dtype=np.float64)
    mean = total / len(rows)
    squares = np.zeros_like(mean)
    for _, block in source.chunks(rows, chunk):
        centred = block.astype(np.float64)
        centred -= mean
        squares += np.einsum("ij,ij->j", centred, centred)
    scale = np.sqrt(squares / len(rows))
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # a constant feature is left unscaled
    return mean, scale


def fit(
    source: StackedRows,
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    C: float,
    tol: float,
    max_iter: int,
    chunk: int | None = None,
) -> StreamedLogistic:
    """Fit on `source`'s `rows` (labels: one per row), reading `chunk` rows at a time (default CHUNK_ROWS)."""
    from scipy import optimize

    classes, targets = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"logistic regression needs at least 2 classes in the data, got {len(classes)}")
    mean, scale = _scaler(source, rows, chunk)
    outputs, width, n = (1 if len(classes) == 2 else len(classes)), source.shape[1] + 1, len(rows)
    penalty = 1.0 / (C * n)

    def loss_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
        weights = flat.reshape((outputs, width), order="F")
        loss, gradient = 0.0, np.zeros((outputs, width))
        for where, block in source.chunks(rows, chunk):
            scaled = _scaled(block, mean, scale)
            coef, intercept = _weights_as(weights, scaled.dtype)
            raw = (scaled @ coef.T + intercept).astype(np.float64)
            part_loss, residual = _loss_residual(raw, targets[where])
            loss += part_loss
            gradient[:, :-1] += np.ascontiguousarray(residual.T, dtype=scaled.dtype) @ scaled
            gradient[:, -1] += residual.sum(axis=0)
        coef = weights[:, :-1]
        gradient /= n
        gradient[:, :-1] += penalty * coef
        return loss / n + 0.5 * penalty * float(np.sum(coef * coef)), gradient.ravel(order="F")

    start = np.zeros(outputs * width)
    result = optimize.minimize(
        loss_gradient,
        start,
        method="L-BFGS-B",
        jac=True,
        options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps},
    )
    return StreamedLogistic(classes, mean, scale, result.x.reshape((outputs, width), order="F"))


def _loss_residual(raw: np.ndarray, targets: np.ndarray) -> tuple[float, Any]:
    """Summed cross-entropy of these rows and d(loss)/d(raw)."""
    if raw.shape[1] == 1:  # binomial: log(1 + e^z) - y z
        z, y = raw[:, 0], targets.astype(np.float64)
        loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
        return loss, (expit(z) - y)[:, None]
    top = raw.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(raw - top).sum(axis=1))
    picked = raw[np.arange(len(raw)), targets]
    residual = np.exp(raw - log_norm[:, None])
    residual[np.arange(len(raw)), targets] -= 1.0
    return float(np.sum(log_norm - picked)), residual
