"""Temperature scaling: one scalar, fitted on validation logits, that makes probabilities honest.

The classifier ends in a softmax, so its saved outputs are probabilities; log-probabilities are
logits up to a per-row constant, which softmax ignores, so `logits_from_probabilities` is all a
caller needs. `fold_temperature` divides the output layer's weights by T, so the saved model itself
gives calibrated probabilities to every consumer (evaluate, serving, TFLite, ONNX). Dividing logits
by T > 0 never changes the argmax (accuracy is untouched); T > 1 softens an over-confident model,
T < 1 sharpens an under-confident one (label smoothing makes
models under-confident). T is chosen to minimise the validation negative log-likelihood (Guo et
al. 2017) and never on test. With `finetune.calibrate: auto` (the default) it is the most
probable T under a prior centred on no scaling, log T ~ Normal(0, PRIOR_SD^2): the prior's weight is fixed
while val's evidence grows with its size, so a large val set decides, while a small one, where the
NLL-optimal T mostly fits that set's luck, is pulled towards T = 1 (30 val images with no error ask for an
unbounded sharpening: the bound). Judged by cross-validation within val (benchmarks/results/calibrators.md),
it gave the lowest mean held-out NLL and ECE over the rows there, below the NLL-optimal T, the same T applied only
when a likelihood-ratio test rejects T = 1 (the rule until 2026-12-07), vector scaling and no scaling; on the
heads of 20 to 100 images per class no scaling is a little better. That test's p-value is still reported, as
the evidence val gives against no scaling.
ECE and the reliability table use components.modeling.metrics, the same definitions evaluate reports.

With flip test-time augmentation the model outputs the mean of softmax(logits_v / T) over its views
(the image and its mirror share one output layer), so logits may also be given as (views, n, classes):
T is then fitted to the averaged probabilities the saved model will really produce. With several
views T can move the argmax of the mean between near-tied classes, so finetune judges TTA on the
calibrated mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.modeling.metrics import calibration_bins, expected_calibration_error

TEMPERATURE_BOUNDS = (0.05, 20.0)  # beyond these a "fit" is a symptom (degenerate val set), not a calibration
# auto: the prior sd of log T: 95% of the prior on T in [0.61, 1.63]. Of 0.25, 0.5 and 1 it gave the lowest mean
# held-out NLL and ECE over calibrators.md's rows (0.5 was within 0.002 of its NLL: better on the fine-tuned rows,
# whose label smoothing needs T near 0.5, worse on the heads of 20 to 100 per class, which need none).
PRIOR_SD = 0.25
_EPS = 1e-12


def logits_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """log p: logits up to a per-row constant (softmax(log p / T) is temperature scaling of the logits)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0))


def _views(logits: np.ndarray) -> np.ndarray:
    """(views, n, classes): a plain (n, classes) array is one view."""
    z = np.asarray(logits, dtype=np.float64)
    return z[None] if z.ndim == 2 else z


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64)))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities softmax(logits / T), averaged over views when there are several."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return np.exp(_log_softmax(_views(logits) / temperature)).mean(axis=0)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p(true label) after dividing the logits by `temperature` (p averaged over views)."""
    from scipy.special import logsumexp

    views = _views(logits)
    rows = np.arange(views.shape[1])
    log_p_true = _log_softmax(views / temperature)[:, rows, labels]  # (views, n)
    return float(np.mean(np.log(len(views)) - logsumexp(log_p_true, axis=0)))


def _checked(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finite rows only (a NaN row has no probability to calibrate), labels validated."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim not in (2, 3) or logits.shape[-2] != len(labels):
        raise ValueError(
            "logits must be (n, classes) or (views, n, classes) with one label per row; "
            f"got {logits.shape} and {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[-1] - 1}")
    finite = np.isfinite(_views(logits)).all(axis=(0, 2))
    return logits[..., finite, :], labels[finite].astype(np.int64)


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    prior_sd: float | None = None,
) -> float:
    """The T in `bounds` minimising validation NLL (a 1-D bounded search over log T); 1.0 if no rows. With
    `prior_sd`, the most probable T under the prior log T ~ Normal(0, prior_sd^2) instead."""
    from scipy.optimize import minimize_scalar

    logits, labels = _checked(logits, labels)
    if not len(labels):
        return 1.0
    prior_weight = 0.0 if prior_sd is None else 1.0 / (2.0 * prior_sd**2 * len(labels))  # per row, as the NLL

    def objective(log_t: float) -> float:
        return negative_log_likelihood(logits, labels, float(np.exp(log_t))) + prior_weight * log_t**2

    result = minimize_scalar(
        objective, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded", options={"xatol": 1e-4}
    )
    # The search is approximate: never hand back a T that is worse than leaving the model alone.
    return float(np.exp(result.x)) if objective(float(result.x)) <= objective(0.0) else 1.0


def no_scaling_p_value(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """p-value of the likelihood-ratio test of T = 1 against `temperature` (fitted on these rows): how likely
    a gain in NLL this large is when the model needs no scaling at all."""
    from scipy.stats import chi2

    logits, labels = _checked(logits, labels)
    if not len(labels):
        return 1.0
    gain = negative_log_likelihood(logits, labels) - negative_log_likelihood(logits, labels, temperature)
    return float(chi2.sf(max(2.0 * len(labels) * gain, 0.0), df=1))


@dataclass(frozen=True)
class TemperatureChoice:
    """The T to apply (1.0 when left alone), the NLL-optimal T on val, and the evidence val gives against T = 1."""

    temperature: float
    fitted: float
    p_value: float


def choose_temperature(logits: np.ndarray, labels: np.ndarray, mode: str = "auto") -> TemperatureChoice:
    """on: the NLL-optimal T; auto: the most probable T under the prior (PRIOR_SD); off: 1.0. The NLL-optimal T
    and the likelihood-ratio p-value against T = 1 are reported either way."""
    if mode == "off":
        return TemperatureChoice(1.0, 1.0, 1.0)
    fitted = fit_temperature(logits, labels)
    p_value = no_scaling_p_value(logits, labels, fitted)
    applied = fitted if mode == "on" else fit_temperature(logits, labels, prior_sd=PRIOR_SD)
    return TemperatureChoice(applied, fitted, p_value)


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> tuple[float, list[dict[str, Any]]]:
    """(ECE, reliability-diagram rows: low, high, count, confidence, accuracy) of top-label predictions."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    table = calibration_bins(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins)
    rows = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in table.to_dict(orient="records")
    ]
    return expected_calibration_error(table), rows


@dataclass(frozen=True)
class CalibrationReport:
    """Before/after numbers on one split, ready for JSON (metrics.json, MLflow) and a plot."""

    temperature: float  # applied (1.0: left alone)
    n: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    reliability_before: list[dict[str, Any]]
    reliability_after: list[dict[str, Any]]
    fitted_temperature: float | None = None  # NLL-optimal on val, applied or not
    p_value: float | None = None  # likelihood-ratio test of T = 1 against the fitted T

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_report(
    logits: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    n_bins: int = 10,
    choice: TemperatureChoice | None = None,
) -> CalibrationReport:
    """How `temperature` changes NLL, ECE and the reliability diagram on these rows (val or test)."""
    logits, labels = _checked(logits, labels)
    ece_before, bins_before = reliability(apply_temperature(logits, 1.0), labels, n_bins)
    ece_after, bins_after = reliability(apply_temperature(logits, temperature), labels, n_bins)
    return CalibrationReport(
        temperature=float(temperature),
        n=int(len(labels)),
        nll_before=negative_log_likelihood(logits, labels) if len(labels) else 0.0,
        nll_after=negative_log_likelihood(logits, labels, temperature) if len(labels) else 0.0,
        ece_before=ece_before,
        ece_after=ece_after,
        reliability_before=bins_before,
        reliability_after=bins_after,
        fitted_temperature=None if choice is None else choice.fitted,
        p_value=None if choice is None else choice.p_value,
    )


def calibrate(val_probs: np.ndarray, val_labels: np.ndarray, n_bins: int = 10, mode: str = "on") -> CalibrationReport:
    """Choose T on validation probabilities (the model's softmax outputs, (n, classes) or per view
    (views, n, classes); `mode` as choose_temperature) and report before/after on val."""
    logits = logits_from_probabilities(val_probs)
    choice = choose_temperature(logits, val_labels, mode)
    return calibration_report(logits, val_labels, choice.temperature, n_bins, choice)


OUTPUT_LAYER = "probabilities"  # components.modeling.backbones: the head's final Dense(softmax)


def _find_layer(model: Any, name: str) -> Any:
    """The layer called `name` in `model` or any sub-model (the head is a nested model)."""
    for layer in getattr(model, "layers", []):
        if layer.name == name:
            return layer
        found = _find_layer(layer, name) if hasattr(layer, "layers") else None
        if found is not None:
            return found
    return None


def fold_temperature(model: Any, temperature: float) -> None:
    """Make `model` output softmax(logits / T) by scaling its final Dense(softmax) layer in place.

    softmax((W x + b) / T) == softmax((W / T) x + b / T): exact, argmax unchanged, nothing to apply later.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    layer = _find_layer(model, OUTPUT_LAYER)
    if layer is None or getattr(layer, "activation", None) is None or layer.activation.__name__ != "softmax":
        raise ValueError(f"no Dense(softmax) layer named {OUTPUT_LAYER!r} to fold a temperature into")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / temperature, bias / temperature])
