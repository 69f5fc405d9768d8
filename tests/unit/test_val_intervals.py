"""95% intervals on known values, and finetune's val decisions recorded with their number of images and
intervals (no model is trained: the models' val probabilities are given)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from components.core import intervals
from components.core.contracts import ModelRunInfo
from components.core.stage_config import FinetuneConfig
from components.core.training_metrics import TrainingMetrics
from components.modeling import model_choice
from components.modeling.model_choice import KeptModel, ValScore, decide_flip_tta


@pytest.mark.parametrize(
    ("correct", "n", "expected"),
    [
        (27, 30, (0.74379, 0.96540)),  # the rule behind ingest.min_val_per_class: about +-0.11 near 0.9
        (0, 10, (0.0, 0.27753)),  # z^2 / (n + z^2): a width even with nothing right
        (10, 10, (0.72247, 1.0)),
        (11, 23, (0.29237, 0.67037)),
    ],
)
def test_wilson_interval_matches_known_values(correct: int, n: int, expected: tuple[float, float]):
    assert intervals.wilson(correct, n) == pytest.approx(expected, abs=1e-5)


def test_wilson_interval_of_nothing_is_everything_and_bad_counts_fail():
    assert intervals.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0, n"):
        intervals.wilson(5, 4)


def pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * both + [True] * only_a + [False] * only_b + [False] * neither)
    b = np.array([True] * both + [False] * only_a + [True] * only_b + [False] * neither)
    return a, b


def test_paired_difference_uses_the_discordant_pairs_with_half_an_image_per_cell():
    # 100 images, b alone right on 15, a alone on 5: (15.5 - 5.5) / 102 +- z * sqrt((21 - 10^2 / 102) / 102^2)
    a, b = pairs(70, 5, 15, 10)
    assert intervals.paired_difference(a, b) == pytest.approx((0.012064, 0.184015), abs=1e-6)
    low, high = intervals.paired_difference(b, a)
    assert (low, high) == pytest.approx((-0.184015, -0.012064), abs=1e-6)  # swapped: negated
    # Concordant pairs only add to n: the same discordant counts on more images give a narrower interval.
    wide, narrow = intervals.paired_difference(*pairs(0, 5, 15, 0)), intervals.paired_difference(*pairs(500, 5, 15, 0))
    assert wide[1] - wide[0] > narrow[1] - narrow[0]


def test_a_tie_on_few_images_still_has_a_width():
    a, b = pairs(20, 0, 0, 3)  # 23 images, identical predictions
    assert intervals.paired_difference(a, b) == pytest.approx((-1.959964 / 25, 1.959964 / 25), abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        intervals.paired_difference(a, b[:-1])


def probabilities(right: list[bool]) -> np.ndarray:
    """Two-class probabilities whose argmax is class 0 where `right` (labels are all 0)."""
    return np.array([[0.8, 0.2] if r else [0.3, 0.7] for r in right])


HEAD = [True] * 6 + [False] * 4  # 6 of 10
FINETUNED = [True] * 9 + [False]  # 9 of 10, right wherever the head is and on 3 more
LABELS = np.zeros(10, int)


def test_the_keep_head_decision_carries_its_images_and_intervals(monkeypatch, capsys):
    views = {"head": np.stack([probabilities(HEAD)] * 2), "finetuned": np.stack([probabilities(FINETUNED)] * 2)}

    class Model:
        weights = "finetuned"

        def get_weights(self):
            return self.weights

        def set_weights(self, weights):
            self.weights = weights

    model = Model()
    monkeypatch.setattr(model_choice, "views_scorer", lambda m, crop: lambda ds: views[m.weights])
    choice, kept_views = model_choice.keep_better(model, "head", None, LABELS, FinetuneConfig())
    # +3 of 10 val images: the gain's interval holds 0, so it is noise and the head stays.
    assert choice.kept == "head" == model.weights and kept_views is views["head"]
    gain = intervals.paired_difference(np.array(HEAD), np.array(FINETUNED))
    assert choice.gain == gain and choice.head.n == 10
    recorded = choice.val_intervals()
    assert recorded["head"] == intervals.rounded(intervals.wilson(6, 10))
    assert recorded["finetuned"] == intervals.rounded(intervals.wilson(9, 10))
    assert recorded["finetuned_minus_head"] == intervals.rounded(gain)
    metrics = choice.metrics()
    assert metrics["val_images"] == 10
    assert [metrics["val_gain_finetuned_low"], metrics["val_gain_finetuned_high"]] == intervals.rounded(gain)
    line = capsys.readouterr().out
    assert "on 10 val images" in line and f"[95% {gain[0]:+.3f} to {gain[1]:+.3f}]" in line
    assert gain[0] < 0 < gain[1] and "keeping the head's weights" in line


def test_with_nothing_trained_only_the_head_interval_is_recorded():
    choice = KeptModel("head", ValScore.of(probabilities(HEAD), LABELS), None)
    assert choice.gain is None and set(choice.val_intervals()) == {"head"}
    assert "val_gain_finetuned_low" not in choice.metrics() and choice.metrics()["val_images"] == 10
    assert ValScore(0.8, 0.2).n == 0 and ValScore(0.8, 0.2).interval() == (0.0, 1.0)  # built by hand: no images


def test_the_flip_tta_decision_carries_its_images_and_intervals(monkeypatch, capsys):
    single, mirrored = probabilities(HEAD), probabilities(FINETUNED)
    flip = decide_flip_tta(single, mirrored, LABELS, "auto")
    gain = intervals.paired_difference(np.array(HEAD), np.array(FINETUNED))
    assert flip.applied and flip.gain == gain
    assert flip.val_intervals() == {
        "single_view": intervals.rounded(intervals.wilson(6, 10)),
        "flip_tta": intervals.rounded(intervals.wilson(9, 10)),
        "flip_tta_minus_single_view": intervals.rounded(gain),
    }
    assert [flip.metrics()["val_gain_flip_tta_low"], flip.metrics()["val_gain_flip_tta_high"]] == intervals.rounded(
        gain
    )
    # finish_model's log line (the Keras wrapper faked: this decision needs no model).
    wrapped = []
    fake = SimpleNamespace(with_flip_tta=lambda m, crop: wrapped.append(crop) or m)
    monkeypatch.setitem(sys.modules, "components.modeling.backbones", fake)
    views = np.stack([single, np.tile([0.95, 0.05], (10, 1))])  # the mirror is surer: the mean fixes every image
    _, decided, crop, _ = model_choice.finish_model("model", views, LABELS, FinetuneConfig(calibrate=False))
    line = capsys.readouterr().out
    assert decided.applied and "on 10 val images" in line and "[95% +" in line and "flip TTA kept" in line
    assert crop is None and wrapped == [False]  # two views given: crops were not judged


def test_crop_views_are_kept_only_when_they_beat_the_flip_decision_on_val(monkeypatch, capsys):
    wrapped = []
    fake = SimpleNamespace(with_flip_tta=lambda m, crop: wrapped.append(crop) or m)
    monkeypatch.setitem(sys.modules, "components.modeling.backbones", fake)
    single, unsure = probabilities(HEAD), np.tile([0.5, 0.5], (10, 1))
    crops_fix_it = np.stack([single, single, np.tile([0.95, 0.05], (10, 1)), unsure])
    _, flip, crop, _ = model_choice.finish_model("model", crops_fix_it, LABELS, FinetuneConfig(calibrate=False))
    gain = intervals.paired_difference(np.array(HEAD), np.ones(10, bool))
    assert not flip.applied and crop.applied and wrapped == [True] and crop.gain == gain
    assert crop.val_accuracy_without == 0.6 and crop.val_accuracy_crop_tta == 1.0
    assert crop.val_intervals()["crop_tta_minus_without"] == intervals.rounded(gain)
    assert crop.metrics()["crop_tta"] == 1 and "crop TTA kept (auto)" in capsys.readouterr().out
    no_help = np.stack([single, single, single, single])
    for mode, kept in (("auto", False), ("on", True), ("off", False)):
        config = FinetuneConfig(calibrate=False, crop_tta=mode)
        _, _, crop, _ = model_choice.finish_model("model", no_help, LABELS, config)
        assert crop.applied is kept  # a tie is not worth twice the views
    assert wrapped[1:] == [True]  # only "on" wrapped the 4 views; one view needs no wrapper


def test_the_records_fit_the_contracts():
    choice = KeptModel("head", ValScore.of(probabilities(HEAD), LABELS), ValScore.of(probabilities(FINETUNED), LABELS))
    flip = decide_flip_tta(probabilities(HEAD), probabilities(HEAD), LABELS, "auto")
    crop = model_choice.decide_crop_tta(probabilities(HEAD), probabilities(FINETUNED), LABELS, "auto")
    metrics = TrainingMetrics(
        val_accuracy=0.6, val_loss=1.0, best_epoch=0, epochs_run=1, seconds=1.0, train_seconds=2.0,
        **flip.metrics(), **crop.metrics(), **choice.metrics(),
    )  # fmt: skip
    assert metrics.crop_tta == 1 and metrics.val_accuracy_crop_tta == 0.9
    assert metrics.val_images == 10 and metrics.val_gain_flip_tta_high == pytest.approx(1.959964 / 12, abs=1e-4)
    info = ModelRunInfo(
        stage="finetune", run_id="r", experiment_id="e", backbone="mobilenet_v2", alpha=0.5, image_size=224,
        weights="imagenet", data_version="d", best_epoch=0, epochs_run=1, val_accuracy=0.6, val_loss=1.0,
        seconds=1.0, device={}, model_sha256="0" * 64, settings={},
        **choice.run_info(), **model_choice.crop_run_info(crop), val_images=10,
        val_intervals={**choice.val_intervals(), **flip.val_intervals(), **crop.val_intervals()},
    )  # fmt: skip
    assert set(info.val_intervals) == {
        "head", "finetuned", "finetuned_minus_head", "single_view", "flip_tta", "flip_tta_minus_single_view",
        "crop_tta", "crop_tta_minus_without",
    }  # fmt: skip
    assert info.crop_tta and info.val_accuracy_crop_tta == 0.9
    assert info.val_intervals["flip_tta_minus_single_view"] == pytest.approx([-1.959964 / 12, 1.959964 / 12], abs=1e-4)
