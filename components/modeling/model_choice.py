"""What finetune saves, decided on val (never test): whose weights, flip test-time augmentation, temperature.

The head and the fine-tuned model are scored on val the same way (one view, before calibration: accuracy
first, then log-loss); unless the fine-tuned weights beat the head's, the head's are kept
(`finetune.keep_head_if_not_better`), so a small data set never ends below where it started. Then flip
TTA is judged on val (`finetune.flip_tta`: auto keeps it only when the mean of the image's and its
mirror's probabilities is more accurate than the image's alone); the temperature is fitted to what the
saved model will output, and a kept TTA is saved inside the model (components.modeling.backbones.with_flip_tta),
so every consumer applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.core import files
from components.core.stage_config import FinetuneConfig
from components.modeling import calibration


@dataclass(frozen=True)
class FlipDecision:
    """Flip test-time augmentation, judged on val: kept when it raises accuracy (auto), or as configured."""

    applied: bool
    val_accuracy_single_view: float
    val_accuracy_flip_tta: float

    def metrics(self) -> dict[str, float]:
        return {
            "flip_tta": int(self.applied),
            "val_accuracy_single_view": round(self.val_accuracy_single_view, 4),
            "val_accuracy_flip_tta": round(self.val_accuracy_flip_tta, 4),
        }


def decide_flip_tta(single: np.ndarray, averaged: np.ndarray, labels: np.ndarray, mode: str) -> FlipDecision:
    """`single`: val probabilities of the image alone; `averaged`: of the mean over image and mirror."""
    single_accuracy = float(np.mean(single.argmax(axis=1) == labels))
    averaged_accuracy = float(np.mean(averaged.argmax(axis=1) == labels))
    # auto: strictly better only; a tie is not worth twice the inference cost.
    return FlipDecision(
        mode == "on" or (mode == "auto" and averaged_accuracy > single_accuracy), single_accuracy, averaged_accuracy
    )


@dataclass(frozen=True)
class ValScore:
    """One model's val score on the image alone, before calibration (T never changes the argmax)."""

    accuracy: float
    log_loss: float  # mean negative log-likelihood, without label smoothing

    @classmethod
    def of(cls, probs: np.ndarray, labels: np.ndarray) -> ValScore:
        labels = np.asarray(labels)
        picked = np.clip(np.asarray(probs, np.float64)[np.arange(len(labels)), labels], 1e-12, 1.0)
        return cls(float(np.mean(probs.argmax(axis=1) == labels)), float(-np.mean(np.log(picked))))


def finetuned_beats_head(head: ValScore, finetuned: ValScore) -> bool:
    """Higher val accuracy wins; on a tie the lower val log-loss; a full tie keeps the head (fewer changed weights)."""
    return (finetuned.accuracy, -finetuned.log_loss) > (head.accuracy, -head.log_loss)


@dataclass(frozen=True)
class KeptModel:
    """Which weights the stage outputs, and both models' val scores (finetuned: None when nothing trained)."""

    kept: str  # "head" | "finetuned"
    head: ValScore
    finetuned: ValScore | None

    def run_info(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "val_accuracy_head": self.head.accuracy,
            "val_log_loss_head": self.head.log_loss,
            "val_accuracy_finetuned": self.finetuned.accuracy if self.finetuned else None,
            "val_log_loss_finetuned": self.finetuned.log_loss if self.finetuned else None,
        }

    def metrics(self) -> dict[str, float]:
        """Numbers only (metrics.json is read by DVC): kept_head 1/0."""
        numbers = {k: round(v, 4) for k, v in self.run_info().items() if isinstance(v, float)}
        return {"kept_head": int(self.kept == "head"), **numbers}


def val_views(model: Any, val_ds: Any) -> np.ndarray:
    """(2, n, classes): the classifier's probabilities on val and on val mirrored, in one pass."""
    from components.modeling.backbones import flip_views

    return np.stack([np.asarray(v, np.float64) for v in flip_views(model).predict(val_ds, verbose=0)])


def keep_better(
    model: Any, head_weights: list[np.ndarray], val_ds: Any, labels: np.ndarray, config: FinetuneConfig
) -> tuple[KeptModel, np.ndarray]:
    """Score the fine-tuned weights and the head's on val; leave the kept ones in `model` and return
    the kept model's val views (reused by `finish_model`)."""
    finetuned_weights, finetuned_views = model.get_weights(), val_views(model, val_ds)
    model.set_weights(head_weights)
    head_views = val_views(model, val_ds)
    head, finetuned = ValScore.of(head_views[0], labels), ValScore.of(finetuned_views[0], labels)
    keep_finetuned = not config.keep_head_if_not_better or finetuned_beats_head(head, finetuned)
    if keep_finetuned:
        model.set_weights(finetuned_weights)
    print(
        f"finetune: val accuracy {head.accuracy:.4f} (log-loss {head.log_loss:.4f}) for the head, "
        f"{finetuned.accuracy:.4f} ({finetuned.log_loss:.4f}) fine-tuned: keeping the "
        + ("fine-tuned weights" if keep_finetuned else "head's weights (fine-tuning did not beat them)")
    )
    return KeptModel("finetuned" if keep_finetuned else "head", head, finetuned), (
        finetuned_views if keep_finetuned else head_views
    )


def _calibrate(model: Any, views: np.ndarray, val_labels: Any) -> calibration.CalibrationReport:
    """Fit a temperature on val (never test), on the views the saved model will average, and fold it
    into the shared output layer."""
    report = calibration.calibrate(views, val_labels)
    calibration.fold_temperature(model, report.temperature)
    print(
        f"finetune: temperature {report.temperature:.3f} fitted on val; "
        f"val ECE {report.ece_before:.4f} -> {report.ece_after:.4f}"
    )
    return report


def finish_model(
    model: Any, views: np.ndarray, val_labels: np.ndarray, config: FinetuneConfig
) -> tuple[Any, FlipDecision, calibration.CalibrationReport | None]:
    """Decide flip TTA on val (`views`: the model's, from `val_views`), calibrate what will be saved,
    and wrap the classifier if TTA is kept."""
    from components.modeling.backbones import with_flip_tta

    # Judge the mean as it would be saved: calibrated (T folded into both views can move a near-tie).
    logits = calibration.logits_from_probabilities(views)
    temperature = calibration.fit_temperature(logits, val_labels) if config.calibrate else 1.0
    flip = decide_flip_tta(views[0], calibration.apply_temperature(logits, temperature), val_labels, config.flip_tta)
    print(
        f"finetune: val accuracy {flip.val_accuracy_single_view:.4f} alone, {flip.val_accuracy_flip_tta:.4f} "
        f"averaged with the mirror image: flip TTA {'kept' if flip.applied else 'not kept'} ({config.flip_tta})"
    )
    calibrated = _calibrate(model, views if flip.applied else views[:1], val_labels) if config.calibrate else None
    return (with_flip_tta(model) if flip.applied else model), flip, calibrated


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
