"""benchmarks/calibrators.py: the vector-scaling fit and the cross-validation within val."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import check_grad

from benchmarks import calibrators
from components.modeling import calibration


def drawn(scale: np.ndarray, bias: np.ndarray, n: int, views: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(scale * logits + bias) of the first view: a model whose right map
    is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(views, n, len(scale))) * 2.0
    probs = calibration.softmax(logits[0] * scale + bias)
    labels = np.array([rng.choice(len(scale), p=row) for row in probs])
    return logits, labels


def test_the_gradient_matches_finite_differences_with_several_views() -> None:
    logits, labels = drawn(np.ones(4), np.zeros(4), 50, views=3)
    point = np.random.default_rng(1).normal(size=8)
    error = check_grad(
        lambda p: calibrators.vector_scaling_nll(p, logits, labels)[0],
        lambda p: calibrators.vector_scaling_nll(p, logits, labels)[1],
        point,
    )
    assert error < 1e-5


def test_the_identity_map_scores_like_the_uncalibrated_model() -> None:
    logits, labels = drawn(np.ones(3), np.zeros(3), 40, views=2)
    identity = np.concatenate([np.ones(3), np.zeros(3)])
    nll, _ = calibrators.vector_scaling_nll(identity, logits, labels)
    assert nll == pytest.approx(calibration.negative_log_likelihood(logits, labels))


def test_vector_scaling_recovers_per_class_scales_that_one_temperature_cannot() -> None:
    scale, bias = np.array([0.3, 1.0, 2.5]), np.array([0.5, 0.0, -0.5])
    logits, labels = drawn(scale, bias, 6000)
    fitted = calibrators.fit_vector_scaling(logits, labels)
    test_logits, test_labels = drawn(scale, bias, 3000, seed=1)
    vector_nll = calibrators.held_out_scores(fitted(test_logits), test_labels)["nll"]
    temperature = calibration.fit_temperature(logits, labels)
    temperature_nll = calibration.negative_log_likelihood(test_logits, test_labels, temperature)
    truth_nll = calibrators.held_out_scores(calibration.softmax(test_logits[0] * scale + bias), test_labels)["nll"]
    assert vector_nll < temperature_nll - 0.02
    assert vector_nll == pytest.approx(truth_nll, abs=0.01)


def test_halves_split_every_class_evenly() -> None:
    labels = np.array([0] * 10 + [1] * 7 + [2] * 2)
    first = calibrators.stratified_halves(labels, np.random.default_rng(0))
    for label, count in ((0, 10), (1, 7), (2, 2)):
        assert abs(2 * int(first[labels == label].sum()) - count) <= 1


def test_cross_validation_finds_the_temperature_an_overconfident_model_needs() -> None:
    logits, labels = drawn(np.full(4, 0.4), np.zeros(4), 400, views=2)  # the model is 2.5x too sure
    maps = calibrators.cross_validate(logits, labels, halvings=3)
    assert set(maps) == {
        "none",
        "temperature",
        "likelihood-ratio test",
        "temperature, auto",
        "prior sd 0.5",
        "prior sd 1",
        "vector scaling",
    }
    assert maps["temperature"]["nll"] < maps["none"]["nll"] - 0.05
    assert maps["temperature"]["ece"] < maps["none"]["ece"]
    assert maps["likelihood-ratio test"]["nll"] == pytest.approx(maps["temperature"]["nll"])  # rejected every time
    assert maps["temperature, auto"]["nll_below_default"] == 0.0  # never below itself


def test_the_default_is_the_pipelines_auto_with_its_prior() -> None:
    logits, labels = drawn(np.full(3, 0.5), np.zeros(3), 80, views=2)
    maps = calibrators.calibrators()
    held_out = logits[:, :10]
    via_benchmark = maps[calibrators.DEFAULT](logits, labels)(held_out)
    auto = calibration.choose_temperature(logits, labels, "auto").temperature
    np.testing.assert_allclose(via_benchmark, calibration.apply_temperature(held_out, auto))
    wider_prior = maps["prior sd 0.5"](logits, labels)(held_out)
    assert not np.allclose(wider_prior, via_benchmark)  # a different prior is a different map


def test_the_report_names_each_rows_lowest_held_out_nll(tmp_path) -> None:
    def scores(nll: float) -> dict[str, float]:
        return {"nll": nll, "ece": 0.05, "accuracy": 0.9, "nll_below_default": 0.5}

    rows = {
        "small": {"val_images": 60, "kept": "head", "maps": {"none": scores(0.2), "temperature, auto": scores(0.1)}},
        "large": {
            "val_images": 400,
            "kept": "finetuned",
            "maps": {"none": scores(0.1), "temperature, auto": scores(0.3)},
        },
    }
    calibrators.write_report(rows, tmp_path)
    text = (tmp_path / "calibrators.md").read_text()
    assert "- small: temperature, auto (the default)" in text
    assert "- large: none, not the default `temperature, auto`" in text
    assert text.count("| small | 60 |") == 2
    assert "| none | 0.1500 | 0.0500 |" in text  # the mean over rows
