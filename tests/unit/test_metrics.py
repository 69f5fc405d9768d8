"""components.modeling.metrics: the numbers evaluate reports and the promotion gate compares."""

from __future__ import annotations

import numpy as np
import pytest

from components.modeling.metrics import (
    align_columns,
    compute_metrics,
    flat_metrics,
    non_finite_rows,
    per_class_recall,
    predictions,
)


def test_top_k_is_reported_only_with_more_than_five_classes() -> None:
    rng = np.random.default_rng(0)
    for n_classes, expected in ((3, False), (6, True)):
        probs = rng.dirichlet(np.ones(n_classes), size=40)
        labels = rng.integers(0, n_classes, size=40)
        metrics = compute_metrics(labels, probs, [f"c{i}" for i in range(n_classes)], top_k=3)
        assert ("top_3_accuracy" in metrics) is expected
        if expected:
            assert metrics["top_3_accuracy"] >= metrics["accuracy"]
            ranks = np.argsort(-probs, axis=1)[:, :3]
            assert metrics["top_3_accuracy"] == pytest.approx((ranks == labels[:, None]).any(axis=1).mean())


def test_overconfident_model_has_large_calibration_error() -> None:
    labels = np.array([0, 1] * 20)
    certain_and_half_wrong = np.tile([[0.99, 0.01]], (40, 1))
    honest = np.array([[0.5, 0.5]] * 40)
    assert compute_metrics(labels, certain_and_half_wrong, ["a", "b"])["ece"] == pytest.approx(0.49, abs=1e-6)
    assert compute_metrics(labels, honest, ["a", "b"])["ece"] == pytest.approx(0.0, abs=1e-6)


def test_per_class_numbers_and_the_lowest_recall() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 0, 0, 1, 1, 1, 2, 0]]  # class a: 3/4, b: 2/2, c: 1/2
    metrics = compute_metrics(labels, probs, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert {c: m["recall"] for c, m in metrics["per_class"].items()} == pytest.approx({"a": 0.75, "b": 1.0, "c": 0.5})
    assert metrics["min_class_recall"] == pytest.approx(0.5)
    assert per_class_recall(labels, probs.argmax(1), ["a", "b", "c"]) == pytest.approx({"a": 0.75, "b": 1.0, "c": 0.5})


def test_non_finite_rows_are_counted_and_never_right() -> None:
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, np.inf], [0.8, 0.2]])
    assert non_finite_rows(probs) == 2
    assert predictions(probs).tolist() == [0, -1, -1, 0]
    metrics = compute_metrics(labels, probs, ["a", "b"])
    assert metrics["non_finite_rows"] == 2
    assert metrics["accuracy"] == pytest.approx(0.5)  # the two NaN/inf rows count as wrong, not as class 0
    assert metrics["per_class"]["b"]["recall"] == 0.0
    assert np.isfinite(metrics["ece"])
    six = compute_metrics(np.array([5]), np.array([[np.nan] * 6]), [f"c{i}" for i in range(6)], top_k=5)
    assert six["top_5_accuracy"] == 0.0


def test_flat_metrics_are_one_level_for_dvc() -> None:
    metrics = compute_metrics(np.array([0, 1]), np.eye(2), ["a b", "c/d"])
    flat = flat_metrics(metrics)
    assert all(isinstance(v, (int, float)) for v in flat.values())
    assert flat["recall_a b"] == 1.0 and flat["n_test"] == 2 and flat["non_finite_rows"] == 0


def test_columns_of_another_model_are_reordered_into_ours() -> None:
    theirs = np.array([[0.7, 0.2, 0.1]])  # columns: c, a, b
    assert align_columns(theirs, ["c", "a", "b"], ["a", "b", "c"]).tolist() == [[0.2, 0.1, 0.7]]
    with pytest.raises(ValueError, match="class sets differ"):
        align_columns(theirs, ["c", "a", "x"], ["a", "b", "c"])


def test_ece_sampling_gives_the_floor_of_a_calibrated_model_and_an_interval_around_the_measured_ece() -> None:
    from components.modeling.metrics import ece_sampling, top_label_ece

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.6, 1.0, 150)
    calibrated = rng.random(150) < confidence  # right as often as it claims
    overconfident = rng.random(150) < confidence - 0.25
    fair, bad = ece_sampling(confidence, calibrated, draws=300), ece_sampling(confidence, overconfident, draws=300)
    assert fair["floor"] == pytest.approx(bad["floor"])  # the floor depends on the confidences alone
    assert 0.02 < fair["floor"] < 0.09  # 150 images in 10 bins: a perfect model still shows a few points
    measured = top_label_ece(confidence, overconfident)
    assert bad["low"] <= measured <= bad["high"] and bad["low"] > fair["floor"] * 2
    assert ece_sampling(confidence, calibrated, draws=300) == fair  # seeded
