"""The fine-tuning loop: the head model with the top of its backbone unfrozen, its input, and a resumable fit.

BatchNorm layers stay frozen and in inference mode (components.modeling.backbones.unfreeze_top). The same code runs
on CPU and GPU: a MirroredStrategy (global batch = batch_size x replicas) with more than one GPU on
TensorFlow; on other backends (JAX on GPU workers, which have no TensorFlow) one device and no strategy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components.core import runtime
from components.core.contracts import MODEL_FILE, ModelRunInfo
from components.core.stage_config import FinetuneConfig
from components.ingestion.images import ImageLimits
from components.modeling import data, model_folder, optimization, snapshots
from components.modeling.checkpoints import Checkpoint
from components.modeling.data import Split


@dataclass(frozen=True)
class _OneDevice:
    """Stands in for tf.distribute's default strategy on other backends: one device, no scope."""

    num_replicas_in_sync: int = 1

    def scope(self) -> Any:
        return contextlib.nullcontext()


def distribution(device: dict[str, Any]) -> Any:
    """A MirroredStrategy over several GPUs on TensorFlow, else the default (one device)."""
    import keras

    if keras.config.backend() != "tensorflow":
        if device["gpus"] > 1:
            print(f"finetune: {device['gpus']} GPUs seen; on the {keras.config.backend()} backend one is used")
        return _OneDevice()
    import tensorflow as tf

    return tf.distribute.MirroredStrategy() if device["gpus"] > 1 else tf.distribute.get_strategy()


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
    optimization.compile_classifier(
        model,
        optimization.lr_schedule(config, steps_per_epoch),
        config.label_smoothing,
        jit_compile=runtime.jit_compile_default(),
    )
    return model, [layer.name for layer in backbone.layers[start:] if layer.trainable]


def datasets(
    train: Split,
    val: Split,
    image_size: int,
    batch_size: int,
    policy_path: str | Path | None,
    seed: int,
    limits: ImageLimits,
) -> tuple[Any, Any]:
    """(train, val) batches with one-hot labels: tf.data on TensorFlow, `ImageBatches` elsewhere."""
    train_ds = data.labelled_batches(
        train, image_size, batch_size, policy_path=policy_path, training=True, seed=seed, limits=limits
    )
    return train_ds, data.labelled_batches(val, image_size, batch_size, cache=True, limits=limits)


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
) -> tuple[pd.DataFrame, int]:
    """Fit with per-epoch backups; return the history of all epochs (across resumes) and the 1-based
    epoch this call started at."""
    epochs_seen = _epoch_recorder()
    callbacks = [
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
        validation_data=val_ds,
        epochs=config.epochs,
        callbacks=callbacks,
        shuffle=False,
        verbose=runtime.progress_verbosity(),
    )  # shuffle=False: the input shuffles, seeded
    return checkpoint.history(), (epochs_seen.epochs[0] if epochs_seen.epochs else 0) + 1
