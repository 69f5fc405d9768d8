"""What finetune saves, decided on val (never test): whose weights, flip and crop test-time augmentation, temperature.

The head and the fine-tuned model are scored on val the same way (one view, before calibration); unless the
fine-tuned weights are more accurate beyond noise (the paired 95% interval of the gain above 0), the head's are
kept (`finetune.keep_head_if_not_better`), so a small data set does not trade its head for a coin flip. Then flip
TTA is judged on val (`finetune.flip_tta`: auto keeps it only when the mean of the image's and its
mirror's probabilities is more accurate than the image's alone), then central crops (`finetune.crop_tta`:
auto keeps the mean over the image, its central crop and both mirrors only when it is more accurate than
what the flip decision gave); the temperature is fitted to what the saved model will output, and a kept TTA
is saved inside the model (components.modeling.backbones.with_flip_tta), so every consumer applies it.

Each choice is recorded with its uncertainty (components/core/intervals.py): the number of val images, a 95%
Wilson interval of each accuracy and a paired 95% interval of the gain the choice was made on, in run.json
(`val_images`, `val_intervals`), metrics.json (`val_gain_*_low/high`) and the log line. A gain whose interval
straddles 0 was decided by noise (see ingest.min_val_per_class for a val split big enough).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.core import files, intervals
from components.core.stage_config import FinetuneConfig
from components.modeling import calibration


@dataclass(frozen=True)
class FlipDecision:
    """Flip test-time augmentation, judged on val: kept when it raises accuracy (auto), or as configured."""

    applied: bool
    val_accuracy_single_view: float
    val_accuracy_flip_tta: float
    correct_single_view: np.ndarray = field(compare=False, repr=False)  # per val image: right or not
    correct_flip_tta: np.ndarray = field(compare=False, repr=False)

    @property
    def gain(self) -> tuple[float, float]:
        """95% interval of val accuracy with the mirror minus without it (paired, same images)."""
        return intervals.paired_difference(self.correct_single_view, self.correct_flip_tta)

    def val_intervals(self) -> dict[str, list[float]]:
        """run.json's val_intervals: each accuracy's (Wilson) and the gain's (paired)."""
        n = self.correct_single_view.size
        return {
            "single_view": intervals.rounded(intervals.wilson(int(self.correct_single_view.sum()), n)),
            "flip_tta": intervals.rounded(intervals.wilson(int(self.correct_flip_tta.sum()), n)),
            "flip_tta_minus_single_view": intervals.rounded(self.gain),
        }

    def metrics(self) -> dict[str, float]:
        low, high = intervals.rounded(self.gain)
        return {
            "flip_tta": int(self.applied),
            "val_accuracy_single_view": round(self.val_accuracy_single_view, 4),
            "val_accuracy_flip_tta": round(self.val_accuracy_flip_tta, 4),
            "val_gain_flip_tta_low": low,
            "val_gain_flip_tta_high": high,
        }


def decide_flip_tta(single: np.ndarray, averaged: np.ndarray, labels: np.ndarray, mode: str) -> FlipDecision:
    """`single`: val probabilities of the image alone; `averaged`: of the mean over image and mirror."""
    single_right, averaged_right = single.argmax(axis=1) == labels, averaged.argmax(axis=1) == labels
    single_accuracy, averaged_accuracy = float(np.mean(single_right)), float(np.mean(averaged_right))
    # auto: strictly better only; a tie is not worth twice the inference cost.
    applied = mode == "on" or (mode == "auto" and averaged_accuracy > single_accuracy)
    return FlipDecision(applied, single_accuracy, averaged_accuracy, single_right, averaged_right)


@dataclass(frozen=True)
class CropDecision:
    """Central-crop views, judged on val: the mean over the image, its central crop and both mirrors, kept when
    it is more accurate than what the flip decision gave (auto), or as configured."""

    applied: bool
    val_accuracy_without: float  # the flip decision's output: one view or the mean with the mirror
    val_accuracy_crop_tta: float
    correct_without: np.ndarray = field(compare=False, repr=False)
    correct_crop_tta: np.ndarray = field(compare=False, repr=False)

    @property
    def gain(self) -> tuple[float, float]:
        return intervals.paired_difference(self.correct_without, self.correct_crop_tta)

    def val_intervals(self) -> dict[str, list[float]]:
        n = self.correct_crop_tta.size
        return {
            "crop_tta": intervals.rounded(intervals.wilson(int(self.correct_crop_tta.sum()), n)),
            "crop_tta_minus_without": intervals.rounded(self.gain),
        }

    def metrics(self) -> dict[str, float]:
        low, high = intervals.rounded(self.gain)
        return {
            "crop_tta": int(self.applied),
            "val_accuracy_crop_tta": round(self.val_accuracy_crop_tta, 4),
            "val_gain_crop_tta_low": low,
            "val_gain_crop_tta_high": high,
        }


def decide_crop_tta(without: np.ndarray, crops: np.ndarray, labels: np.ndarray, mode: str) -> CropDecision:
    """`without`: val probabilities the flip decision gives; `crops`: of the mean over the four views."""
    without_right, crops_right = without.argmax(axis=1) == labels, crops.argmax(axis=1) == labels
    without_accuracy, crops_accuracy = float(np.mean(without_right)), float(np.mean(crops_right))
    applied = mode == "on" or (mode == "auto" and crops_accuracy > without_accuracy)  # strictly: 2x the views
    return CropDecision(applied, without_accuracy, crops_accuracy, without_right, crops_right)


@dataclass(frozen=True)
class ValScore:
    """One model's val score on the image alone, before calibration (T never changes the argmax)."""

    accuracy: float
    log_loss: float  # mean negative log-likelihood, without label smoothing
    correct: np.ndarray | None = field(default=None, compare=False, repr=False)  # per val image: right or not

    @classmethod
    def of(cls, probs: np.ndarray, labels: np.ndarray) -> ValScore:
        labels = np.asarray(labels)
        picked = np.clip(np.asarray(probs, np.float64)[np.arange(len(labels)), labels], 1e-12, 1.0)
        correct = probs.argmax(axis=1) == labels
        return cls(float(np.mean(correct)), float(-np.mean(np.log(picked))), correct)

    @property
    def n(self) -> int:
        return 0 if self.correct is None else int(self.correct.size)

    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy."""
        return intervals.wilson(0 if self.correct is None else int(self.correct.sum()), self.n)


def finetuned_beats_head(head: ValScore, finetuned: ValScore) -> bool:
    """Fine-tuning replaces the head only when val shows it more accurate beyond noise: the paired 95% interval of
    the accuracy gain lies above 0. It changed a hundred layers on a few hundred images; on hymenoptera it won by 2
    of 60 val images ([-0.022, +0.086]) and then scored 0.895 on test, against the head's 0.941."""
    if head.correct is None or finetuned.correct is None:
        raise ValueError("both val scores need their per-image results to compare")
    low, _ = intervals.paired_difference(head.correct, finetuned.correct)
    return low > 0


@dataclass(frozen=True)
class KeptModel:
    """Which weights the stage outputs, and both models' val scores (finetuned: None when nothing trained)."""

    kept: str  # "head" | "finetuned"
    head: ValScore
    finetuned: ValScore | None

    @property
    def gain(self) -> tuple[float, float] | None:
        """95% interval of val accuracy fine-tuned minus head (paired, same images); None when nothing trained."""
        if self.finetuned is None or self.head.correct is None or self.finetuned.correct is None:
            return None
        return intervals.paired_difference(self.head.correct, self.finetuned.correct)

    def val_intervals(self) -> dict[str, list[float]]:
        """run.json's val_intervals: each accuracy's (Wilson) and the gain's (paired)."""
        found = {"head": self.head.interval()}
        if self.finetuned is not None:
            found["finetuned"] = self.finetuned.interval()
        if self.gain is not None:
            found["finetuned_minus_head"] = self.gain
        return {name: intervals.rounded(interval) for name, interval in found.items()}

    def run_info(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "val_accuracy_head": self.head.accuracy,
            "val_log_loss_head": self.head.log_loss,
            "val_accuracy_finetuned": self.finetuned.accuracy if self.finetuned else None,
            "val_log_loss_finetuned": self.finetuned.log_loss if self.finetuned else None,
        }

    def metrics(self) -> dict[str, float]:
        """Numbers only (metrics.json is read by DVC): kept_head 1/0, val images, the gain's interval."""
        numbers = {k: round(v, 4) for k, v in self.run_info().items() if isinstance(v, float)}
        gain = {} if self.gain is None else dict(zip(("low", "high"), intervals.rounded(self.gain)))
        gain = {f"val_gain_finetuned_{end}": value for end, value in gain.items()}
        return {"kept_head": int(self.kept == "head"), "val_images": self.head.n, **numbers, **gain}


def views_scorer(model: Any, crop: bool = False) -> Callable[[Any], np.ndarray]:
    """dataset -> (views, n, classes): the classifier's probabilities on it and on its mirror image (with `crop`
    also on the central crop and its mirror), in one pass, with whatever weights `model` holds at the call
    (one Keras model: traced once, however often it scores)."""
    from components.modeling.backbones import flip_views

    every = flip_views(model, crop)
    return lambda dataset: np.stack([np.asarray(v, np.float64) for v in every.predict(dataset, verbose=0)])


def val_views(model: Any, val_ds: Any, crop: bool = False) -> np.ndarray:
    """(views, n, classes): the classifier's probabilities on val and on val mirrored (and cropped), in one pass."""
    return views_scorer(model, crop)(val_ds)


def keep_better(
    model: Any, head_weights: list[np.ndarray], val_ds: Any, labels: np.ndarray, config: FinetuneConfig
) -> tuple[KeptModel, np.ndarray]:
    """Score the fine-tuned weights and the head's on val; leave the kept ones in `model` and return
    the kept model's val views (reused by `finish_model`)."""
    # Both weight sets through one model: a second model would trace again (seconds).
    score = views_scorer(model, config.crop_tta != "off")
    finetuned_weights, finetuned_views = model.get_weights(), score(val_ds)
    model.set_weights(head_weights)
    head_views = score(val_ds)
    head, finetuned = ValScore.of(head_views[0], labels), ValScore.of(finetuned_views[0], labels)
    keep_finetuned = not config.keep_head_if_not_better or finetuned_beats_head(head, finetuned)
    if keep_finetuned:
        model.set_weights(finetuned_weights)
    choice = KeptModel("finetuned" if keep_finetuned else "head", head, finetuned)
    print(
        f"finetune: on {head.n} val images, accuracy {head.accuracy:.4f} {_shown(head.interval(), '')} (log-loss "
        f"{head.log_loss:.4f}) for the head, {finetuned.accuracy:.4f} {_shown(finetuned.interval(), '')} "
        f"({finetuned.log_loss:.4f}) fine-tuned, gain {finetuned.accuracy - head.accuracy:+.4f} {_shown(choice.gain)}: "
        + ("keeping the fine-tuned weights" if keep_finetuned else "keeping the head's weights (no gain beyond noise)")
    )
    return choice, (finetuned_views if keep_finetuned else head_views)


def _shown(interval: tuple[float, float] | None, sign: str = "+") -> str:
    """A 95% interval for a log line (sign "": an accuracy, "+": a gain)."""
    return "" if interval is None else f"[95% {interval[0]:{sign}.3f} to {interval[1]:{sign}.3f}]"


def _calibrate(model: Any, views: np.ndarray, val_labels: Any, mode: str) -> calibration.CalibrationReport:
    """Choose a temperature on val (never test), on the views the saved model will average, and fold it
    into the shared output layer (auto: shrunk towards T = 1 by calibration.PRIOR_SD)."""
    report = calibration.calibrate(views, val_labels, mode=mode)
    calibration.fold_temperature(model, report.temperature)
    print(
        f"finetune: temperature {report.fitted_temperature:.3f} NLL-optimal on {report.n} val images "
        f"(likelihood-ratio p = {report.p_value:.3g} against T = 1), {report.temperature:.3f} applied ({mode}); "
        f"val ECE {report.ece_before:.4f} -> {report.ece_after:.4f}"
    )
    return report


def finish_model(
    model: Any, views: np.ndarray, val_labels: np.ndarray, config: FinetuneConfig
) -> tuple[Any, FlipDecision, CropDecision | None, calibration.CalibrationReport | None]:
    """Decide flip TTA, then crop TTA, on val (`views`: the model's, from `val_views`: 2, or 4 with crops),
    calibrate what will be saved, and wrap the classifier if TTA is kept."""
    from components.modeling.backbones import with_flip_tta

    # Judge each mean as it would be saved: calibrated (T folded into every view can move a near-tie).
    def calibrated_mean(chosen: np.ndarray) -> np.ndarray:
        logits = calibration.logits_from_probabilities(chosen)
        return calibration.apply_temperature(
            logits, calibration.choose_temperature(logits, val_labels, config.calibrate).temperature
        )

    flip = decide_flip_tta(views[0], calibrated_mean(views[:2]), val_labels, config.flip_tta)
    print(
        f"finetune: on {len(val_labels)} val images, accuracy {flip.val_accuracy_single_view:.4f} alone, "
        f"{flip.val_accuracy_flip_tta:.4f} averaged with the mirror image, gain "
        f"{flip.val_accuracy_flip_tta - flip.val_accuracy_single_view:+.4f} {_shown(flip.gain)}: "
        f"flip TTA {'kept' if flip.applied else 'not kept'} ({config.flip_tta})"
    )
    kept_views, crop = (views[:2] if flip.applied else views[:1]), None
    if len(views) == 4:
        crop = decide_crop_tta(calibrated_mean(kept_views), calibrated_mean(views), val_labels, config.crop_tta)
        print(
            f"finetune: accuracy {crop.val_accuracy_without:.4f} without central crops, "
            f"{crop.val_accuracy_crop_tta:.4f} averaged over the image, its central crop and their mirrors, gain "
            f"{crop.val_accuracy_crop_tta - crop.val_accuracy_without:+.4f} {_shown(crop.gain)}: "
            f"crop TTA {'kept' if crop.applied else 'not kept'} ({config.crop_tta})"
        )
        kept_views = views if crop.applied else kept_views
    calibrated = None if config.calibrate == "off" else _calibrate(model, kept_views, val_labels, config.calibrate)
    wrapped = with_flip_tta(model, crop=len(kept_views) == 4) if len(kept_views) > 1 else model
    return wrapped, flip, crop, calibrated


def crop_run_info(crop: CropDecision | None) -> dict[str, Any]:
    """run.json's crop TTA keys (nothing when crops were not judged: crop_tta off)."""
    if crop is None:
        return {}
    return {"crop_tta": crop.applied, "val_accuracy_crop_tta": crop.val_accuracy_crop_tta}


def calibration_metrics(report: calibration.CalibrationReport | None) -> dict[str, float]:
    """The temperature and val ECE before and after it (empty when not calibrated)."""
    if report is None:
        return {}
    return {
        "temperature": round(report.temperature, 4),
        "val_ece_before": report.ece_before,
        "val_ece_after": report.ece_after,
    }


def log_calibration(client: Any, run_id: str, report: calibration.CalibrationReport | None, report_dir: Path) -> None:
    """reports/finetune/calibration.json (always written: a DVC out) and the numbers in MLflow."""
    path = report_dir / "calibration.json"
    files.write_json(
        path, {"calibrated": True, **report.to_dict()} if report else {"calibrated": False, "temperature": 1.0}
    )
    client.log_artifact(run_id, str(path))
    for key, value in calibration_metrics(report).items():
        client.log_metric(run_id, key, value)
