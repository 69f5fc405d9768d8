"""The fine-tuning loop: the head model with the top of its backbone unfrozen, its input, and a resumable fit.

BatchNorm layers stay frozen and in inference mode (components.modeling.backbones.unfreeze_top). The same code runs
on CPU and on several accelerators: the caller builds, compiles and fits inside a `ReplicaPlan`'s scope
(components.modeling.distribution: keras DataParallel under JAX, MirroredStrategy under TensorFlow), and
`finetune.batch_size` is the global batch, split across the replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components.core import runtime
from components.core.contracts import MODEL_FILE, ModelRunInfo
from components.core.stage_config import FinetuneConfig
from components.ingestion.images import ImageLimits
from components.modeling import data, low_res_phase, mixup, model_folder, optimization, snapshots
from components.modeling.checkpoints import Checkpoint
from components.modeling.data import Split
from components.modeling.distribution import ReplicaPlan


def for_data(config: FinetuneConfig, train: Split) -> FinetuneConfig:
    """`config` with its learning rate resolved for this training split (its mean images per class).

    The default, 5e-5 below 125 images per class and 2e-4 from there, follows a val-only sweep on flower_photos
    subsets and hymenoptera (benchmarks/results/finetune_rule.md). Up to 92 per class no rate beat the head beyond
    noise, and the rates differed by 0 to 3 val images (5e-5 ahead at 14, 70 and 92, 2e-4 at 35); at 170 both beat
    it and 2e-4 did more (0.887 against 0.874 on 151 val images), as on all of flower_photos. 125 is the geometric
    middle of 92 and 170. Small data is protected more by model_choice.finetuned_beats_head than by the rate.
    """
    per_class = len(train) / max(1, len(set(train.labels)))
    return config.model_copy(update={"learning_rate": config.peak_rate(per_class)})


def check_low_res_size(config: FinetuneConfig, image_size: int) -> None:
    """A low-resolution phase must be at a lower resolution than the model's (checked before any training)."""
    if config.low_res_epochs and config.low_res_size >= image_size:
        raise ValueError(
            f"finetune.low_res_size ({config.low_res_size}) must be below the model's image size ({image_size})"
        )


def compiled_model(
    head_dir: Path, head_info: ModelRunInfo, config: FinetuneConfig, steps_per_epoch: int
) -> tuple[Any, list[str]]:
    """The head model with the top of its backbone unfrozen, compiled (after changing `trainable`);
    and the names of the backbone layers that train."""
    from components.modeling import backbones

    default_layers = backbones.get_spec(head_info.backbone).default_unfreeze_layers
    model = model_folder.load_keras_model(head_dir / MODEL_FILE, expected_sha256=head_info.model_sha256)
    backbone = backbones.find_backbone(model)
    start = backbones.unfreeze_top(backbone, config, default_layers)
    trained = [layer.name for layer in backbone.layers[start:] if layer.trainable]
    factors = optimization.layer_rate_factors(backbone, trained, config.bottom_lr_factor)
    optimization.compile_classifier(
        model,
        None,
        config.label_smoothing,
        jit_compile=runtime.jit_compile_default(),
        optimizer=optimization.finetune_optimizer(config, steps_per_epoch, factors),
    )
    return model, trained


@dataclass(frozen=True)
class TrainingInput:
    """What finetune's training batches are made of, at whichever image size they are asked for (the model's, or
    a low-resolution phase's)."""

    train: Split
    batch_size: int
    policy_path: str | Path | None
    seed: int
    limits: ImageLimits
    plan: ReplicaPlan
    mixup_alpha: float = 0.0

    def batches(self, image_size: int) -> Any:
        """Shuffled, augmented batches with one-hot labels: tf.data on TensorFlow, `ImageBatches` elsewhere; a
        multiple of the replicas where the plan needs even batches, mixed up at `mixup_alpha` (0: not)."""
        train_ds = data.labelled_batches(
            self.train,
            image_size,
            self.batch_size,
            policy_path=self.policy_path,
            training=True,
            seed=self.seed,
            limits=self.limits,
            batch_multiple=self.plan.replicas if self.plan.even_batches else 1,
        )
        return mixup.mixed_batches(train_ds, self.mixup_alpha, self.seed)


def datasets(training: TrainingInput, val: Split, image_size: int) -> tuple[Any, Any]:
    """(train, val) batches at `image_size`; val unaugmented, decoded once and cached."""
    val_ds = data.labelled_batches(val, image_size, training.batch_size, cache=True, limits=training.limits)
    return training.batches(image_size), val_ds


def low_res_first(
    model: Any, config: FinetuneConfig, image_size: int, training: TrainingInput, checkpoint: Checkpoint
) -> dict[str, Any] | None:
    """Progressive resizing (`finetune.low_res_epochs`): the first epochs at `low_res_size`, through the model's
    low-resolution twin (components.modeling.low_res_phase), inside the plan's scope. None when off, or when a
    resumed run's backup already holds later epochs."""
    check_low_res_size(config, image_size)
    if not config.low_res_epochs or checkpoint.has_backup():
        return None
    batches = training.batches(config.low_res_size)
    with training.plan.scope():
        return low_res_phase.train(model, batches, config.low_res_epochs, config.low_res_size, config.label_smoothing)


def _epoch_recorder() -> Any:
    """A callback noting the 0-based epochs fit() runs (BackupAndRestore may skip the first ones)."""
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[int] = []

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epochs.append(epoch)

    return EpochRecorder()


def fit_resumable(
    model: Any,
    train_ds: Any,
    val_ds: Any,
    config: FinetuneConfig,
    checkpoint: Checkpoint,
    logger: Any,
    extra_callbacks: list[Any],
    plan: ReplicaPlan,
) -> tuple[pd.DataFrame, int]:
    """Fit with per-epoch backups (call it inside `plan.scope()`), from epoch `config.low_res_epochs` (those
    epochs ran at low resolution first: `low_res_first`); return the history of all epochs fit() ran (across
    resumes) and the 1-based epoch of those this call started at (1: a fresh start)."""
    epochs_seen = _epoch_recorder()
    validation_data, validation = plan.validation_callbacks(val_ds)  # first: the others read its val_* logs
    callbacks = [
        *validation,
        *checkpoint.callbacks(),
        optimization.early_stopping(config.early_stopping_patience),
        logger,
        epochs_seen,
        *data.epoch_callbacks(train_ds),
        *extra_callbacks,
        *snapshots.snapshot_callbacks("finetune"),
    ]
    model.fit(
        train_ds,
        validation_data=validation_data,
        epochs=config.epochs,
        initial_epoch=config.low_res_epochs,
        callbacks=callbacks,
        shuffle=False,
        verbose=runtime.progress_verbosity(),
    )  # shuffle=False: the input shuffles, seeded
    first = epochs_seen.epochs[0] if epochs_seen.epochs else config.low_res_epochs
    return checkpoint.history(), first - config.low_res_epochs + 1
