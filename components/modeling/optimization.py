"""How the classifier learns: one loss, metric and optimizer for train_head and finetune, early stopping on
val loss, and finetune's learning-rate schedule (linear warm-up, then cosine decay)."""

from __future__ import annotations

from typing import Any

from components.core.stage_config import FinetuneConfig


def compile_classifier(model: Any, learning_rate: float | Any, label_smoothing: float, jit_compile: bool) -> None:
    """Adam at `learning_rate` (a number or a schedule), smoothed categorical cross-entropy, accuracy."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )


def early_stopping(patience: int) -> Any:
    """Stop when val loss has not improved for `patience` epochs and restore the best epoch's weights."""
    import keras

    return keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)


def lr_schedule(config: FinetuneConfig, steps_per_epoch: int) -> Any:
    """Linear warm-up to `learning_rate` over `warmup_epochs`, then cosine decay towards 0. A rate by data size
    must be resolved for the data first (fine_tuning.for_data, FinetuneConfig.peak_rate)."""
    import keras

    if isinstance(config.learning_rate, dict):
        raise ValueError("finetune.learning_rate gives rates by data size: resolve it for the data first (peak_rate)")

    warmup = min(config.warmup_epochs, max(config.epochs - 1, 0)) * steps_per_epoch
    decay = max(1, config.epochs * steps_per_epoch - warmup)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=decay)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=decay, warmup_target=config.learning_rate, warmup_steps=warmup
    )
