"""How the classifier learns: one loss, metric and optimizer for train_head and finetune, early stopping on
val loss, and finetune's learning-rate schedule (linear warm-up, then cosine decay), with its optional
weight EMA and discriminative rates (levers measured in benchmarks/results/training_levers.md)."""

from __future__ import annotations

from typing import Any

from components.core.stage_config import FinetuneConfig


def compile_classifier(
    model: Any,
    learning_rate: float | Any,
    label_smoothing: float,
    jit_compile: bool,
    optimizer: Any | None = None,
) -> None:
    """Adam at `learning_rate` (a number or a schedule) unless an `optimizer` is given, smoothed categorical
    cross-entropy, accuracy."""
    import keras

    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(learning_rate),
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


def ema_momentum(ema_epochs: float, steps_per_epoch: int) -> float | None:
    """The EMA momentum whose horizon (1 / (1 - momentum) steps) is `ema_epochs` epochs; None when off, or when
    that horizon is a step or less (nothing to average)."""
    horizon = ema_epochs * steps_per_epoch
    return 1.0 - 1.0 / horizon if horizon > 1 else None


def layer_rate_factors(model: Any, trained_layers: list[str], bottom_factor: float) -> dict[str, float]:
    """{variable path: learning-rate factor}: the lowest of the trained backbone layers that have weights gets
    `bottom_factor`, each one up a geometric step more, the top one and the head 1. {} when the factor is 1."""
    if bottom_factor >= 1.0:
        return {}
    trained = set(trained_layers)
    weighted = [layer for layer in _all_layers(model) if layer.name in trained and layer.trainable_weights]
    last = max(1, len(weighted) - 1)
    return {
        variable.path: bottom_factor ** ((last - rank) / last)
        for rank, layer in enumerate(weighted)
        for variable in layer.trainable_weights
    }


def _all_layers(model: Any) -> list[Any]:
    """Every layer of `model`, nested models' layers in their order, depth first."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found


def finetune_optimizer(config: FinetuneConfig, steps_per_epoch: int, rate_factors: dict[str, float]) -> Any:
    """Adam on finetune's schedule; with `config.ema_epochs`, the weights' EMA overwrites them at every epoch's
    end (so val, early stopping and checkpoints see it); with `rate_factors`, per-variable learning rates."""
    import keras

    momentum = ema_momentum(config.ema_epochs, steps_per_epoch)
    ema = {"use_ema": True, "ema_momentum": momentum, "ema_overwrite_frequency": steps_per_epoch} if momentum else {}
    schedule = lr_schedule(config, steps_per_epoch)
    if not rate_factors:
        return keras.optimizers.Adam(schedule, **ema)
    from components.modeling.layerwise_adam import LayerwiseAdam

    return LayerwiseAdam(rate_factors=rate_factors, learning_rate=schedule, **ema)
