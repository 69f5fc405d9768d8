"""train_head's optional second head: the softmax layer fitted exactly as an L2-regularised logistic regression.

The Adam head is regularised only by where early stopping cuts it off; on the cached features the same Dense
layer can instead be fitted to convergence (L-BFGS) for each strength of an L2 penalty, and the strength chosen
on val log-loss. It is fitted on each training image's un-augmented vector, in the features' own scale (no
standardisation): the weights stay as small as the Adam head's, so fine-tuning starts from a head of the same
scale. `train_head.solver: auto` keeps it when its val log-loss is below the Adam head's; the default stays
`adam`: on val, the linear head had the lower log-loss on five of six sizes rows but lower accuracy on two,
and at 200 images per class fine-tuning's gain over it (0.854 to 0.887) fell inside the noise, so the run kept
a head scoring 0.861 with the mirror view where the Adam run keeps the fine-tuned model, 0.907 with it
(benchmarks/results/head_solver.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.modeling.model_choice import ValScore

# Inverse L2 strengths tried, weakest penalty last: 0.001 .. 100, half a decade apart.
C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 11))


@dataclass(frozen=True)
class LinearHead:
    """Dense weights for the head's softmax layer (kernel: features x classes) and how they were chosen."""

    kernel: np.ndarray
    bias: np.ndarray
    c: float
    val_accuracy: float
    val_loss: float
    train_accuracy: float
    train_loss: float
    path: list[dict[str, float]]  # per C tried: val accuracy and log-loss


def softmax_probs(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float64) @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def dense_weights(model: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted LogisticRegression as a softmax Dense layer's (kernel, bias), a column per class 0..n-1.

    Binary fits hold one weight vector w (class 1 against 0): the softmax of [-w/2, w/2] is the same sigmoid.
    """
    coef, intercept = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_, np.float64)
    if len(model.classes_) == 2 and coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    kernel = np.zeros((coef.shape[1], num_classes))
    bias = np.full(num_classes, -1e4)  # a class the fit never saw is never predicted
    for row, label in enumerate(model.classes_):
        kernel[:, int(label)], bias[int(label)] = coef[row], intercept[row]
    return kernel, bias


def fit_linear_head(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    sample_weight: np.ndarray | None = None,
    grid: tuple[float, ...] = C_GRID,
) -> LinearHead:
    """Fit the regression for each C in `grid` (warm-started from the previous one) and keep the C with the
    lowest val log-loss (a proper score: smoother than accuracy on a few dozen val images)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    (x, y), (val_x, val_y) = train, val
    if len(np.unique(y)) < 2:
        raise ValueError("the linear head needs training images of at least two classes")
    model = LogisticRegression(C=grid[0], max_iter=1000, warm_start=True)  # tol 1e-4: ample to rank C by val
    best: LinearHead | None = None
    path = []
    for c in grid:
        model.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # 1000 iterations: close enough to pick C
            model.fit(x, y, sample_weight=sample_weight)
        kernel, bias = dense_weights(model, num_classes)
        scored = ValScore.of(softmax_probs(val_x, kernel, bias), val_y)
        path.append(
            {"C": round(c, 6), "val_accuracy": round(scored.accuracy, 4), "val_loss": round(scored.log_loss, 4)}
        )
        if best is None or scored.log_loss < best.val_loss:
            fitted = ValScore.of(softmax_probs(x, kernel, bias), y)
            best = LinearHead(
                kernel.astype(np.float32),
                bias.astype(np.float32),
                c,
                scored.accuracy,
                scored.log_loss,
                fitted.accuracy,
                fitted.log_loss,
                path,
            )
    assert best is not None
    return best
