"""Temperature scaling: fitted on synthetic over/under-confident logits it recovers the distortion,
moves ECE towards 0, and never changes a prediction."""

from __future__ import annotations

import numpy as np
import pytest

from components import calibration
from components.metrics import compute_metrics


def synthetic(distortion: float, n: int = 4000, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the "model" reports z * distortion (> 1 over-, < 1 under-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, classes))
    p = calibration.softmax(z)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return z * distortion, labels


@pytest.mark.parametrize("distortion", [3.0, 1 / 3])
def test_fitted_temperature_undoes_the_distortion_and_keeps_every_prediction(distortion: float) -> None:
    val_logits, val_labels = synthetic(distortion, seed=1)
    test_logits, test_labels = synthetic(distortion, seed=2)
    temperature = calibration.fit_temperature(val_logits, val_labels)
    assert temperature == pytest.approx(distortion, rel=0.1)

    report = calibration.calibration_report(test_logits, test_labels, temperature)
    assert report.ece_before > 0.05  # the distortion is visible ...
    assert report.ece_after < 0.03 and report.ece_after < report.ece_before / 3  # ... and gone after scaling
    assert report.nll_after < report.nll_before
    calibrated = calibration.apply_temperature(test_logits, temperature)
    np.testing.assert_array_equal(calibrated.argmax(axis=1), test_logits.argmax(axis=1))
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, atol=1e-12)


def test_calibrating_softmax_outputs_equals_calibrating_logits() -> None:
    """The saved model outputs probabilities: log p is as good as the logits (shift invariance)."""
    logits, labels = synthetic(2.5, n=1500, seed=3)
    probs = calibration.softmax(logits)
    from_probs = calibration.fit_temperature(calibration.logits_from_probabilities(probs), labels)
    assert from_probs == pytest.approx(calibration.fit_temperature(logits, labels), rel=1e-3)
    report = calibration.calibrate(probs, labels)
    assert report.temperature == pytest.approx(from_probs, rel=1e-3) and report.ece_after < report.ece_before


def test_ece_and_reliability_rows_match_what_evaluate_reports() -> None:
    logits, labels = synthetic(2.0, n=800, seed=4)
    probs = calibration.softmax(logits)
    ece, rows = calibration.reliability(probs, labels, n_bins=10)
    metrics = compute_metrics(labels, probs, [f"c{i}" for i in range(5)], calibration_bins_count=10)
    assert ece == pytest.approx(metrics["ece"])
    assert [r["count"] for r in rows] == [r["count"] for r in metrics["calibration"]]
    assert sum(r["count"] for r in rows) == len(labels)


def test_a_calibrated_model_is_left_nearly_alone() -> None:
    logits, labels = synthetic(1.0, n=4000, seed=5)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_bad_inputs_are_refused_and_nan_rows_ignored() -> None:
    logits, labels = synthetic(3.0, n=600, seed=6)
    with pytest.raises(ValueError, match="labels must lie"):
        calibration.fit_temperature(logits, labels + 10)
    with pytest.raises(ValueError, match="one label per row"):
        calibration.fit_temperature(logits, labels[:-1])
    with pytest.raises(ValueError, match="positive"):
        calibration.apply_temperature(logits, 0.0)
    with_nan = logits.copy()
    with_nan[0] = np.nan
    assert calibration.fit_temperature(with_nan, labels) == pytest.approx(
        calibration.fit_temperature(logits[1:], labels[1:]), rel=1e-6)
    assert calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_folding_the_temperature_into_the_output_layer_equals_scaling_the_logits() -> None:
    import keras

    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    head = keras.Model(hidden, keras.layers.Dense(4, activation="softmax", name="probabilities")(hidden), name="head")
    model = keras.Model(inputs, head(keras.layers.Dense(8)(inputs)))  # the output layer sits in a sub-model
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    before = model.predict(x, verbose=0)

    calibration.fold_temperature(model, 2.5)
    after = model.predict(x, verbose=0)

    expected = calibration.apply_temperature(calibration.logits_from_probabilities(before), 2.5)
    np.testing.assert_allclose(after, expected, atol=1e-5)
    np.testing.assert_array_equal(after.argmax(axis=1), before.argmax(axis=1))
    assert after.max(axis=1).mean() < before.max(axis=1).mean()  # T > 1 softens


def test_folding_refuses_a_model_without_a_softmax_output_layer() -> None:
    import keras

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="probabilities")(inputs))  # linear: not probabilities
    with pytest.raises(ValueError, match="probabilities"):
        calibration.fold_temperature(model, 2.0)
    with pytest.raises(ValueError, match="positive"):
        calibration.fold_temperature(model, 0.0)
