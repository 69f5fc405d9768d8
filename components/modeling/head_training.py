"""Fitting train_head's classifier head: on cached frozen features (fast) or end to end through the frozen backbone.

The head trained on cached features is the same Keras sub-model that sits on the backbone in the saved
full model, so predictions are identical to running the full model on the images. End to end, every
epoch sees freshly augmented images through the tf.data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core import array_rows, runtime, tracking
from components.core.config import Params
from components.core.contracts import read_manifest
from components.core.paths import EMBEDDING_CACHE, TrainHeadPaths
from components.core.stage_config import TrainHeadConfig
from components.core.tracking_connection import RetryPolicy
from components.ingestion.images import ImageLimits
from components.modeling import (
    data,
    data_checks,
    drift,
    feature_cache,
    frozen_forward,
    linear_head,
    optimization,
    snapshots,
)
from components.modeling.calibration import OUTPUT_LAYER
from components.modeling.data import Split, load_split, make_dataset
from components.modeling.data_checks import DataChecks
from components.modeling.model_choice import ValScore


@dataclass(frozen=True)
class HeadData:
    """The manifest and its splits; classes: every label in the manifest, sorted."""

    frame: pd.DataFrame
    train: Split
    val: Split
    test: Split  # only for the suspect-label check: nothing is fitted or chosen on it

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @classmethod
    def read(cls, manifest: str | Path) -> HeadData:
        frame = read_manifest(manifest)
        train = load_split(frame, "train")
        val, test = load_split(frame, "val", train.classes), load_split(frame, "test", train.classes)
        if not len(train) or not len(val):
            raise ValueError(f"{manifest}: need train and val images (have {len(train)} train, {len(val)} val)")
        return cls(frame, train, val, test)


@dataclass(frozen=True)
class HeadFit:
    history: dict[str, list[float]]
    feature_cache: Path | None  # the cache file the head trained on (None: trained end to end)
    checks: DataChecks
    solver: dict[str, Any] | None = None  # Adam head vs linear head on val, and which was kept (None: Adam only)


def callbacks(params: Params, client: Any, run_id: str) -> list[Any]:
    """Early stopping, learning-rate decay on plateaus, per-epoch MLflow metrics, epoch snapshots if asked."""
    import keras

    patience = params.train_head.early_stopping_patience
    return [
        optimization.early_stopping(patience),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=max(1, patience // 2), min_lr=1e-6),
        tracking.mlflow_epoch_logger(client, run_id, policy=RetryPolicy.from_config(params.tracking)),
        *snapshots.snapshot_callbacks(
            "train_head", weights_of="head" if params.train_head.cached_features else "model"
        ),
    ]


def _one_hot(ds: Any, num_classes: int) -> Any:
    import tensorflow as tf

    return ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)))


def vector_batches(
    x: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    num_classes: int,
    batch_size: int,
    seed: int,
    training: bool,
    repeat: bool = False,
) -> Any:
    """Feature vectors `x[rows]` and one-hot labels in batches, shuffled (seeded, every epoch) when training;
    `repeat`: endless, reshuffled at every pass (the fit then counts steps per epoch).

    Only the row indices live in the pipeline: each batch is read from `x` (a memory map of the cache) when it
    is due, so memory holds a few batches, not the features (resident pages of the map included). The seeded
    shuffle permutes positions alone, so it gives the same order as shuffling the vectors themselves did.
    """
    import tensorflow as tf

    def gather(batch_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # take: the map's pages are let go after each batch, so an epoch does not leave the whole file resident.
        return array_rows.take(x, batch_rows).astype(np.float32, copy=False), np.asarray(y[batch_rows], np.int32)

    def read(batch_rows: Any) -> tuple[Any, Any]:
        features, labels = tf.numpy_function(gather, [batch_rows], [tf.float32, tf.int32], stateful=False)
        features.set_shape([None, *x.shape[1:]])
        labels.set_shape([None])
        return features, labels

    ds = tf.data.Dataset.from_tensor_slices(np.asarray(rows, dtype=np.int64))
    if training:
        ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return _one_hot(ds.batch(batch_size).map(read), num_classes).prefetch(tf.data.AUTOTUNE)


def training_rows(excluded: np.ndarray, total_rows: int) -> np.ndarray:
    """Row indices of the training vectors to fit on: every copy (as is, then augmented) of each image
    not `excluded`, in cache order."""
    images = len(excluded)
    kept = np.flatnonzero(~excluded)
    return (np.arange(0, total_rows, images)[:, None] + kept[None, :]).ravel()


def epoch_steps(samples: int, batch_size: int, min_steps: int) -> int | None:
    """Batches per epoch when one pass over `samples` is fewer than `min_steps` (small data: an epoch reads
    the vectors several times over), else None (an epoch is one pass). Epoch-counted settings (epochs,
    patience, the plateau schedule) then mean at least min_steps updates at any data size: on 71 flower
    photos an epoch was 7 updates, and the head's best val loss came at epoch 39 of 40."""
    one_pass = -(-samples // batch_size)
    return None if one_pass >= min_steps else min_steps


def fit_on_cached_features(
    model: Any, inputs: HeadData, params: Params, paths: TrainHeadPaths, fit_callbacks: list[Any]
) -> HeadFit:
    """Train the model's head sub-model alone on cached features (it stays attached to `model`).

    On the way, the same features rank suspect labels of every split (training images only are excluded,
    with action `exclude`) and give the drift reference; both land in the result's `checks`. The test split
    is read only for that check (its features, one un-augmented pass, are cached with the rest).
    """
    from components.modeling import backbones

    h, train, n = params.train_head, inputs.train, len(inputs.classes)
    checks = DataChecks()

    def make_extractor() -> frozen_forward.FrozenRunner:
        runner = feature_cache.frozen_runner(backbones.feature_extractor(model), h, paths.cache_dir)
        checks.feature_engine = runner.engine
        checks.feature_replicas = runner.replicas
        return runner

    check = h.label_issues.action != "off"
    splits = {"train": train, "val": inputs.val, **({"test": inputs.test} if check else {})}
    shared = Path(paths.cache_dir).parent / EMBEDDING_CACHE.name  # validate's, beside the feature cache
    arrays, cache_path = feature_cache.cached_features(
        make_extractor, splits, params, paths.manifest, paths.policy, paths.cache_dir, shared
    )
    plain = arrays["train_x"][: len(train)]  # the un-augmented copy of each training image comes first
    train_x, train_y = arrays["train_x"], arrays["train_y"]
    excluded = np.zeros(len(train), dtype=bool)
    if check:
        checks.issues = data_checks.suspect_labels(plain, arrays, train, inputs.val, inputs.test, params)
        excluded = checks.issues.excluded[: len(train)]  # training images come first; only they are ever excluded
    rows = training_rows(excluded, len(train_x))  # an excluded image's augmented copies go too
    weights = data.class_weights(train.labels[~excluded], n, h.class_weighting)
    head = model.get_layer(backbones.HEAD_LAYER)
    val_x = arrays["val_x"]
    val_batches = vector_batches(val_x, arrays["val_y"], np.arange(len(val_x)), n, h.batch_size, 0, False)
    # A few dense weights: XLA buys nothing.
    optimization.compile_classifier(head, h.learning_rate, h.label_smoothing, jit_compile=False)
    steps = epoch_steps(len(rows), h.batch_size, h.min_epoch_steps)
    fit = head.fit(
        vector_batches(train_x, train_y, rows, n, h.batch_size, params.project.seed, True, repeat=steps is not None),
        validation_data=val_batches,
        epochs=h.epochs,
        steps_per_epoch=steps,
        class_weight=weights,
        callbacks=fit_callbacks,
        shuffle=False,
        verbose=runtime.progress_verbosity(),
    )  # shuffle=False: tf.data shuffles, seeded
    val_probs = head.predict(val_batches, verbose=0)
    solver = None
    if h.solver != "adam" and not h.hidden_units:  # a hidden layer: no linear counterpart
        plain_rows = np.flatnonzero(~excluded)
        train_xy = (array_rows.take(plain, plain_rows).astype(np.float32), train.labels[plain_rows])
        solver = choose_head(head, train_xy, (np.asarray(val_x, np.float32), arrays["val_y"]), val_probs, weights, h)
        if solver["kept"] == "lbfgs":
            val_probs = head.predict(val_batches, verbose=0)
            after_adam = len(fit.history["val_loss"]) + 1
            snapshots.save_snapshot("train_head", head, after_adam, "head", solver["val_accuracy"])
    val_confidence = float(val_probs.max(axis=1).mean())
    checks.reference = drift.build_reference(
        plain,
        train.labels,
        train.classes,
        inputs.frame.loc[inputs.frame["split"] == "train", "sha256"],
        val_confidence,
        params.drift.reference_per_class,
        params.project.seed,
    )
    return HeadFit(fit.history, cache_path, checks, solver)


def choose_head(
    head: Any,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    adam_val_probs: np.ndarray,
    class_weight: dict[int, float] | None,
    config: TrainHeadConfig,
) -> dict[str, Any]:
    """Fit the linear head (`linear_head`) beside the Adam-trained one and leave in `head` whichever has the lower
    val log-loss (solver auto; lbfgs keeps the linear head whatever val says). Returns both scores and the choice."""
    (x, y), (val_x, val_y) = train, val
    n = adam_val_probs.shape[1]
    weights = None if class_weight is None else np.array([class_weight[int(label)] for label in y])
    fitted = linear_head.fit_linear_head((x, y), (val_x, val_y), n, weights)
    adam_score = ValScore.of(adam_val_probs, val_y)
    adam = {"val_accuracy": round(adam_score.accuracy, 4), "val_loss": round(adam_score.log_loss, 4)}
    linear = {"C": fitted.c, "val_accuracy": round(fitted.val_accuracy, 4), "val_loss": round(fitted.val_loss, 4)}
    kept = "lbfgs" if config.solver == "lbfgs" or fitted.val_loss < adam["val_loss"] else "adam"
    if kept == "lbfgs":
        head.get_layer(OUTPUT_LAYER).set_weights([fitted.kernel, fitted.bias])
    print(
        f"head: Adam val accuracy {adam['val_accuracy']:.4f} (log-loss {adam['val_loss']:.4f}); linear (L-BFGS, "
        f"C={fitted.c:g} of {len(fitted.path)} on val log-loss) {linear['val_accuracy']:.4f} "
        f"({linear['val_loss']:.4f}): keeping the {'linear' if kept == 'lbfgs' else 'Adam'} head"
    )
    chosen = linear if kept == "lbfgs" else adam
    return {
        "kept": kept,
        "val_accuracy": chosen["val_accuracy"],
        "val_loss": chosen["val_loss"],
        "adam": adam,
        "lbfgs": {**linear, "train_accuracy": round(fitted.train_accuracy, 4), "path": fitted.path},
    }


def fit_end_to_end(
    model: Any, inputs: HeadData, params: Params, paths: TrainHeadPaths, fit_callbacks: list[Any]
) -> HeadFit:
    """Train through the frozen backbone on freshly augmented images every epoch."""
    h, size, n = params.train_head, params.model.image_size, len(inputs.classes)
    optimization.compile_classifier(model, h.learning_rate, h.label_smoothing, runtime.jit_compile_default())
    limits = ImageLimits.from_config(params.validate)
    train_ds = make_dataset(
        inputs.train,
        size,
        h.batch_size,
        policy_path=paths.policy,
        training=True,
        seed=params.project.seed,
        limits=limits,
    )
    val_ds = make_dataset(inputs.val, size, h.batch_size, cache=True, limits=limits)
    fit = model.fit(
        _one_hot(train_ds, n),
        validation_data=_one_hot(val_ds, n),
        epochs=h.epochs,
        class_weight=data.class_weights(inputs.train.labels, n, h.class_weighting),
        callbacks=fit_callbacks,
        shuffle=False,
        verbose=runtime.progress_verbosity(),
    )
    print("label issues: skipped (they need train_head.cached_features: true)")
    reference = drift.reference_from_model(model, inputs.frame, inputs.classes, params)
    return HeadFit(fit.history, None, DataChecks(reference=reference))
