"""Temperature scaling: fitted on synthetic over/under-confident logits it recovers the distortion,
moves ECE towards 0, and never changes a prediction."""

from __future__ import annotations

import numpy as np
import pytest

from components.modeling import calibration
from components.modeling.metrics import compute_metrics


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
        calibration.fit_temperature(logits[1:], labels[1:]), rel=1e-6
    )
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


def test_with_two_views_the_temperature_fits_the_mean_of_their_softmaxes() -> None:
    """Flip TTA: the saved model averages softmax(z_v / T) over the image and its mirror."""
    from scipy.optimize import minimize_scalar

    logits, labels = synthetic(1 / 3, n=3000, seed=7)
    noise = np.random.default_rng(8).normal(0.0, 0.3, logits.shape)
    views = np.stack([logits + noise, logits - noise])
    one_view = calibration.fit_temperature(views[:1], labels)
    assert one_view == pytest.approx(calibration.fit_temperature(views[0], labels))  # (1, n, c) is (n, c)

    temperature = calibration.fit_temperature(views, labels)

    def nll(t: float) -> float:  # the definition, written out: mean -log of the averaged probabilities
        p = (calibration.softmax(views[0] / t) + calibration.softmax(views[1] / t)) / 2
        return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))

    best = minimize_scalar(nll, bounds=(0.05, 20), method="bounded").x
    assert temperature == pytest.approx(best, rel=1e-2)
    assert calibration.negative_log_likelihood(views, labels, temperature) == pytest.approx(nll(temperature), rel=1e-9)
    report = calibration.calibration_report(views, labels, temperature)
    assert report.ece_after < report.ece_before and report.n == len(labels)


def test_folding_into_a_flip_tta_model_scales_both_views() -> None:
    import keras

    from components.modeling.backbones import HorizontalFlip, with_flip_tta

    images = keras.Input((None, None, 3))
    flat = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(images))
    classifier = keras.Model(images, keras.layers.Dense(3, activation="softmax", name="probabilities")(flat))
    tta = with_flip_tta(classifier)
    x = np.random.default_rng(9).uniform(0, 255, (16, 5, 5, 3)).astype("float32")
    views = np.stack([classifier.predict(x, verbose=0), classifier.predict(HorizontalFlip()(x), verbose=0)])

    calibration.fold_temperature(tta, 0.5)
    expected = calibration.apply_temperature(calibration.logits_from_probabilities(views), 0.5)
    np.testing.assert_allclose(tta.predict(x, verbose=0), expected, atol=1e-5)


def test_auto_takes_the_fitted_temperature_where_val_is_large_and_pulls_small_val_towards_one() -> None:
    # A clearly over-confident model on 400 val images: the evidence outweighs the prior, auto is the fit.
    logits, labels = synthetic(3.0, n=400, seed=9)
    strong = calibration.choose_temperature(logits, labels, "auto")
    assert strong.p_value < 1e-6 and strong.fitted == pytest.approx(3.0, rel=0.25)
    assert strong.temperature == pytest.approx(strong.fitted, rel=0.1) and strong.temperature < strong.fitted
    logits, labels = synthetic(3.0, n=4000, seed=9)  # ten times the evidence: the prior hardly moves it
    larger = calibration.choose_temperature(logits, labels, "auto")
    assert larger.temperature == pytest.approx(larger.fitted, rel=0.01)
    # A calibrated model on 60 val images: the fitted T wanders from 1 by luck alone; auto goes part of the way.
    for seed in range(20):
        logits, labels = synthetic(1.0, n=60, seed=100 + seed)
        choice = calibration.choose_temperature(logits, labels, "auto")
        assert choice.fitted != 1.0 and 0.0 <= choice.p_value <= 1.0
        assert 0 < np.log(choice.temperature) / np.log(choice.fitted) < 1  # same side of 1, closer to it
    on = calibration.choose_temperature(logits, labels, "on")
    off = calibration.choose_temperature(logits, labels, "off")
    assert on.temperature == on.fitted and off == calibration.TemperatureChoice(1.0, 1.0, 1.0)


def test_a_val_set_without_errors_does_not_sharpen_the_model_to_the_bound() -> None:
    logits, labels = synthetic(0.5, n=30, seed=4)  # under-confident, as label smoothing leaves a model
    right = logits.argmax(axis=1) == labels
    logits, labels = logits[right], labels[right]  # every val image right: NLL keeps falling as T shrinks
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(calibration.TEMPERATURE_BOUNDS[0], rel=0.01)
    auto = calibration.choose_temperature(logits, labels, "auto").temperature
    assert 0.15 < auto < 1.0  # sharper, as the evidence says, but nowhere near 20x


def test_auto_improves_held_out_log_loss_of_small_val_sets_on_average() -> None:
    """On many small val sets from one mildly under-confident model, auto's T scores better on new data than the
    NLL-optimal T does (which fits each set's luck), and better than no scaling."""
    test_logits, test_labels = synthetic(0.8, n=4000, seed=1)
    nll = calibration.negative_log_likelihood
    losses = {"auto": [], "on": [], "off": []}
    for seed in range(30):
        logits, labels = synthetic(0.8, n=40, seed=200 + seed)
        for mode, found in losses.items():
            found.append(
                nll(test_logits, test_labels, calibration.choose_temperature(logits, labels, mode).temperature)
            )
    assert np.mean(losses["auto"]) < np.mean(losses["on"]) and np.mean(losses["auto"]) < np.mean(losses["off"])


def test_the_p_value_is_the_likelihood_ratio_tests() -> None:
    from scipy.stats import chi2

    logits, labels = synthetic(1.5, n=200, seed=11)
    fitted = calibration.fit_temperature(logits, labels)
    nll = calibration.negative_log_likelihood
    statistic = 2 * 200 * (nll(logits, labels) - nll(logits, labels, fitted))
    assert calibration.no_scaling_p_value(logits, labels, fitted) == pytest.approx(chi2.sf(statistic, 1))
    report = calibration.calibrate(calibration.softmax(logits), labels, mode="auto")
    assert report.fitted_temperature == pytest.approx(fitted, rel=1e-3) and report.p_value < 0.05
    assert 1.0 < report.temperature < report.fitted_temperature  # auto: pulled a little towards 1
    assert report.to_dict()["p_value"] == report.p_value
