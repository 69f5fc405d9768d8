"""reports/<stage>/metrics.json of train_head and finetune: what they measured on val, as numbers for DVC."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class TrainingMetrics(BaseModel):
    """reports/<stage>/metrics.json of train_head and finetune: validation results and training time.

    `dvc exp show` lists them next to the test metrics (so sweeps choose on val, never on test);
    DVC reads them too, so they hold numbers only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    val_accuracy: float
    val_loss: float
    best_epoch: int
    epochs_run: int
    seconds: float
    train_seconds: float = Field(description="this stage plus the stages it builds on (finetune: head + finetune)")
    # finetune with `calibrate`: the temperature fitted on val and val ECE before and after it
    temperature: float | None = None
    val_ece_before: float | None = None
    val_ece_after: float | None = None
    # finetune: flip test-time augmentation judged on val (1 = kept in the saved model, 0 = not)
    flip_tta: int | None = None
    val_accuracy_single_view: float | None = None
    val_accuracy_flip_tta: float | None = None
    # finetune: central-crop views judged on val (1 = the model averages 4 views: image, crop and their mirrors)
    crop_tta: int | None = None
    val_accuracy_crop_tta: float | None = None
    # finetune: 1 = the head's weights kept (fine-tuning did not beat them on val); both models' val scores
    kept_head: int | None = None
    val_accuracy_head: float | None = None
    val_log_loss_head: float | None = None
    val_accuracy_finetuned: float | None = None
    val_log_loss_finetuned: float | None = None
    # finetune: val images behind both choices; 95% paired intervals of the accuracy gains they were made on
    val_images: int | None = None
    val_gain_finetuned_low: float | None = None
    val_gain_finetuned_high: float | None = None
    val_gain_flip_tta_low: float | None = None
    val_gain_flip_tta_high: float | None = None
    val_gain_crop_tta_low: float | None = None
    val_gain_crop_tta_high: float | None = None

    def write(self, path: str | Path) -> Path:
        from components.core.files import write_json

        write_json(path, self.model_dump(mode="json", exclude_none=True))  # numbers only, for DVC
        return Path(path)
