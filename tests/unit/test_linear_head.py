"""train_head's linear head (components/modeling/linear_head.py) and the choice between it and the Adam head."""

from __future__ import annotations

import numpy as np
import pytest

from components.core.config import ParamsError
from components.modeling import head_training, linear_head
from components.modeling.model_choice import ValScore
from tests.modelkit import tiny_params


def _blobs(n: int, classes: int, dims: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class: overlapping (spread ~ 1) so the L2 strength matters."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(classes, dims))
    y = rng.integers(0, classes, n)
    return (centers[y] + spread * rng.normal(size=(n, dims))).astype(np.float32), y


def test_the_softmax_weights_reproduce_sklearns_probabilities_for_two_and_more_classes() -> None:
    from sklearn.linear_model import LogisticRegression

    for classes in (2, 4):
        x, y = _blobs(120, classes, 6, 1.0, seed=1)
        model = LogisticRegression(C=0.5, max_iter=1000).fit(x, y)
        kernel, bias = linear_head.dense_weights(model, classes)
        assert kernel.shape == (6, classes)
        np.testing.assert_allclose(linear_head.softmax_probs(x, kernel, bias), model.predict_proba(x), atol=1e-6)


def test_a_class_without_training_images_is_never_predicted() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(90, 3, 5, 1.0, seed=2)
    y = np.where(y == 1, 2, y)  # class 1 has no images left
    kernel, bias = linear_head.dense_weights(LogisticRegression(max_iter=1000).fit(x, y), 3)
    probs = linear_head.softmax_probs(x, kernel, bias)
    assert probs[:, 1].max() < 1e-6 and (probs.argmax(axis=1) != 1).all()


def test_the_strength_is_the_one_with_the_lowest_val_log_loss_and_is_neither_end_of_the_grid() -> None:
    train, val = _blobs(80, 3, 40, 2.0, seed=3), _blobs(300, 3, 40, 2.0, seed=4)
    fitted = linear_head.fit_linear_head(train, val, 3)
    losses = [row["val_loss"] for row in fitted.path]
    assert len(fitted.path) == len(linear_head.C_GRID)
    assert fitted.c == linear_head.C_GRID[int(np.argmin(losses))]
    assert fitted.val_loss == pytest.approx(min(losses), abs=1e-4)
    # 80 noisy images in 40 dimensions: no penalty overfits and the strongest underfits, so val picks between.
    assert fitted.c not in (linear_head.C_GRID[0], linear_head.C_GRID[-1])
    probs = linear_head.softmax_probs(val[0], fitted.kernel, fitted.bias)
    assert ValScore.of(probs, val[1]).log_loss == pytest.approx(fitted.val_loss, abs=1e-4)
    assert fitted.train_accuracy > fitted.val_accuracy  # scored on what it was fitted to


def test_one_class_is_refused() -> None:
    x, _ = _blobs(20, 2, 3, 1.0, seed=5)
    with pytest.raises(ValueError, match="at least two classes"):
        linear_head.fit_linear_head((x, np.zeros(20, int)), (x, np.zeros(20, int)), 2)


def _head(features: int, classes: int):
    from components.modeling.backbones import build_head

    return build_head(features, classes, tiny_params().train_head)


@pytest.mark.parametrize(
    ("solver", "adam_is_good", "kept"), [("auto", False, "lbfgs"), ("auto", True, "adam"), ("lbfgs", True, "lbfgs")]
)
def test_the_head_left_in_the_model_is_the_one_chosen(solver: str, adam_is_good: bool, kept: str) -> None:
    train, val = _blobs(200, 3, 8, 1.0, seed=6), _blobs(150, 3, 8, 1.0, seed=7)
    head = _head(8, 3)
    before = [w.copy() for w in head.get_layer("probabilities").get_weights()]
    # The Adam head's val probabilities: all but perfect (it wins), or uniform (the linear head wins).
    adam_probs = np.eye(3)[val[1]] * 0.98 + 0.02 / 3 if adam_is_good else np.full((150, 3), 1 / 3)
    config = tiny_params(train_head={"solver": solver}).train_head
    choice = head_training.choose_head(head, train, val, adam_probs, {0: 1.0, 1: 1.0, 2: 1.0}, config)
    assert choice["kept"] == kept
    after = head.get_layer("probabilities").get_weights()
    if kept == "adam":
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        assert choice["val_loss"] == choice["adam"]["val_loss"]
    else:
        predicted = head.predict(val[0], verbose=0)
        assert ValScore.of(predicted, val[1]).log_loss == pytest.approx(choice["lbfgs"]["val_loss"], abs=1e-3)
        assert choice["val_accuracy"] == choice["lbfgs"]["val_accuracy"]


def test_lbfgs_without_cached_features_or_with_a_hidden_layer_is_a_params_error() -> None:
    for section in ({"solver": "lbfgs", "cached_features": False}, {"solver": "lbfgs", "hidden_units": 16}):
        with pytest.raises(ParamsError, match="train_head.solver"):
            tiny_params(train_head=section)
    # auto with a hidden layer is accepted: that head has no linear counterpart, so Adam's is fitted alone
    assert tiny_params(train_head={"hidden_units": 16, "solver": "auto"}).train_head.hidden_units == 16
