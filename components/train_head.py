"""Stage `train_head`: a new classifier head on a frozen ImageNet backbone.

Fast path (`train_head.cached_features: true`): the frozen backbone runs in inference mode, so its
pooled features are a pure function of the image. They are computed once per image (plus
`augmented_copies` augmented variants of each training image), cached on disk under a key of
everything that determines them, and the head is trained on the vectors alone, which takes
seconds per epoch instead of minutes. The head trained this way is the same Keras sub-model that
sits on the backbone in the saved full model, so predictions are identical to running the full
model on the images. With `cached_features: false` the head trains end to end through the frozen
backbone on the augmenting tf.data pipeline (every epoch sees fresh augmentations).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components import (
    data,
    drift,
    errors,
    files,
    frozen_forward,
    hashing,
    images,
    label_issues,
    learning_curves,
    model_folder,
    runtime,
    snapshots,
    tracking,
)
from components.config import Params, ParamsError, TrainHeadConfig, load_params
from components.contracts import TrainingMetrics, read_manifest
from components.data import Split, image_batches, load_split, make_dataset
from components.images import ImageLimits
from components.settings import environment, workspace_root

DEFAULT_CACHE_DIR = Path("data/cache/features")  # outside DVC outs: a cache, not a result; under workspace_root()


@dataclass
class DataChecks:
    """What the cached-features path learns about the data on the way (issue 13)."""

    issues: label_issues.LabelIssues | None = None  # suspect labels (None: action off or no cached features)
    reference: drift.Reference | None = None  # the drift reference saved with the model
    feature_engine: str | None = None  # what computed the features this run (None: cache hit or not cached)


@dataclass(frozen=True)
class TrainHeadResult:
    run_id: str
    val_accuracy: float
    best_epoch: int
    epochs_run: int
    seconds: float
    feature_cache: Path | None
    out_dir: Path


def feature_cache_key(params: Params, manifest: str | Path, policy_path: str | Path | None) -> str:
    import keras

    m, h = params.model, params.train_head
    return hashing.content_key(
        {
            "data": hashing.file_sha256(manifest),
            "backbone": m.backbone,
            "alpha": m.alpha,
            "image_size": m.image_size,
            "weights": hashing.weights_identity(m.weights),
            "pooling": h.pooling,
            "policy": hashing.file_sha256(policy_path) if policy_path and h.augmented_copies else None,
            "copies": h.augmented_copies,
            "seed": params.project.seed,
            "keras": keras.__version__,
            "engine": h.feature_engine,
            "decoder": images.DECODE_VERSION,  # the same manifest decodes to other pixels after a loader change
        }
    )


def copy_seeds(seed: int, copy: int, count: int) -> np.ndarray:
    """Per-image augmentation seeds of one augmented copy: fixed, and different per copy."""
    return np.random.default_rng([seed, copy]).integers(0, 2**31 - 1, size=count, dtype=np.int64)


def extract_features(
    extractor: Any,
    split: Split,
    image_size: int,
    batch_size: int,
    *,
    policy_path: str | Path | None = None,
    copies: int = 0,
    seed: int = 0,
    limits: ImageLimits | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image as is, then of `copies` augmented variants: (features, labels)."""
    blocks, labels = [], []
    for copy in range(copies + 1):
        seeds = copy_seeds(seed, copy, len(split)) if copy else None
        print(f"features: {len(split)} images, " + (f"augmented copy {copy}/{copies}" if copy else "as is"))
        batches = image_batches(
            split.paths, image_size, batch_size, policy_path=policy_path if copy else None, seeds=seeds, limits=limits
        )
        blocks.append(np.asarray(extractor.predict(batches, verbose=runtime.progress_verbosity()), dtype=np.float32))
        labels.append(split.labels)
    return np.concatenate(blocks), np.concatenate(labels).astype(np.int32)


def cached_features(
    make_extractor: Callable[[], Any],
    train: Split,
    val: Split,
    params: Params,
    manifest: str | Path,
    policy_path: str | Path | None,
    cache_dir: str | Path,
    test: Split | None = None,
) -> tuple[dict[str, np.ndarray], Path]:
    """Load the feature cache for these inputs, or compute (with `make_extractor()`) and write it.

    Given `test`, its un-augmented features too (the suspect-label check scores test images): a cache
    written without them gains them with one pass over the test split, the rest is reused.
    """
    path = Path(cache_dir) / f"{feature_cache_key(params, manifest, policy_path)}.npz"
    arrays: dict[str, np.ndarray] = {}
    if path.is_file():
        print(f"features: reusing cache {path}")
        with np.load(path) as cache:
            arrays = {k: cache[k] for k in cache.files}
    wanted = {"train": train, "val": val, **({"test": test} if test is not None else {})}
    missing = [name for name in wanted if f"{name}_x" not in arrays]
    if not missing:
        return arrays, path
    extractor = make_extractor()  # only on a miss: an ONNX export costs seconds
    h, size, seed = params.train_head, params.model.image_size, params.project.seed
    limits = ImageLimits.from_config(params.validate)
    for name in missing:
        split = wanted[name]
        if not len(split):  # an empty test split: nothing to run the backbone on
            width = arrays["train_x"].shape[1]
            arrays[f"{name}_x"], arrays[f"{name}_y"] = np.zeros((0, width), np.float32), np.zeros(0, np.int32)
            continue
        copies = h.augmented_copies if name == "train" and policy_path else 0
        arrays[f"{name}_x"], arrays[f"{name}_y"] = extract_features(
            extractor,
            split,
            size,
            h.batch_size,
            policy_path=policy_path if copies else None,
            copies=copies,
            seed=seed,
            limits=limits,
        )
    with files.atomic_file(path, "wb") as fh:
        np.savez(fh, **arrays)
    return arrays, path


def frozen_runner(extractor: Any, config: TrainHeadConfig, cache_dir: str | Path) -> frozen_forward.FrozenRunner:
    """The feature extractor on ONNX Runtime where it is faster (a CPU with it installed), Keras otherwise.

    The ONNX file is cached by content next to the feature cache (the ImageNet backbone exports once).
    """
    runner = frozen_forward.FrozenRunner(
        extractor, cache_dir=Path(cache_dir).parent / "onnx", engine=config.feature_engine
    )
    print(f"features: {runner.engine} ({runner.reason})")
    return runner


def _one_hot(ds: Any, num_classes: int) -> Any:
    import tensorflow as tf

    return ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)))


def _vectors(x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int, seed: int, training: bool) -> Any:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return _one_hot(ds.batch(batch_size), num_classes).prefetch(tf.data.AUTOTUNE)


def _compile(model: Any, learning_rate: float, label_smoothing: float, jit_compile: bool) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )


def _callbacks(params: Params, client: Any, run_id: str) -> list[Any]:
    import keras

    patience = params.train_head.early_stopping_patience
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=max(1, patience // 2), min_lr=1e-6),
        tracking.mlflow_epoch_logger(client, run_id, policy=tracking.RetryPolicy.from_config(params.tracking)),
    ]


def _fit_on_cached_features(
    model: Any,
    train: Split,
    val: Split,
    params: Params,
    manifest: str | Path,
    policy_path: str | Path | None,
    cache_dir: str | Path,
    weights: dict[int, float] | None,
    callbacks: list[Any],
    checks: DataChecks,
    train_sha256: list[str],
    test: Split | None = None,
) -> tuple[dict[str, list[float]], Path]:
    """Train the model's head sub-model alone on cached features (it stays attached to `model`).

    On the way, the same features rank suspect labels of every split (training images only are excluded,
    with action `exclude`) and give the drift reference; both land in `checks`. `test` is read only for
    that check (its features, one un-augmented pass, are cached with the rest).
    """
    from components import backbones

    h, n = params.train_head, len(train.classes)

    def make_extractor() -> frozen_forward.FrozenRunner:
        runner = frozen_runner(backbones.feature_extractor(model), h, cache_dir)
        checks.feature_engine = runner.engine
        return runner

    check = h.label_issues.action != "off"
    arrays, cache_path = cached_features(
        make_extractor, train, val, params, manifest, policy_path, cache_dir, test if check else None
    )
    plain = arrays["train_x"][: len(train)]  # the un-augmented copy of each training image comes first
    train_x, train_y = arrays["train_x"], arrays["train_y"]
    if check:
        checks.issues = _suspect_labels(plain, arrays, train, val, test, params)
        excluded = checks.issues.excluded[: len(train)]  # training images come first; only they are ever excluded
        if excluded.any():
            keep = np.tile(~excluded, len(train_x) // len(train))  # drop augmented copies too
            train_x, train_y = train_x[keep], train_y[keep]
            weights = data.class_weights(train.labels[~excluded], n, h.class_weighting)
    head = model.get_layer(backbones.HEAD_LAYER)
    _compile(head, h.learning_rate, h.label_smoothing, jit_compile=False)  # a few dense weights: XLA buys nothing
    fit = head.fit(
        _vectors(train_x, train_y, n, h.batch_size, params.project.seed, True),
        validation_data=_vectors(arrays["val_x"], arrays["val_y"], n, h.batch_size, 0, False),
        epochs=h.epochs,
        class_weight=weights,
        callbacks=callbacks,
        shuffle=False,
        verbose=runtime.progress_verbosity(),
    )  # shuffle=False: tf.data shuffles, seeded
    val_confidence = float(head.predict(arrays["val_x"], verbose=0).max(axis=1).mean())
    checks.reference = drift.build_reference(
        plain,
        train.labels,
        train.classes,
        train_sha256,
        val_confidence,
        params.drift.reference_per_class,
        params.project.seed,
    )
    return fit.history, cache_path


def _suspect_labels(
    plain: np.ndarray, arrays: dict[str, np.ndarray], train: Split, val: Split, test: Split | None, params: Params
) -> label_issues.LabelIssues:
    """Suspect labels over train, val and test (in that order), from the cached un-augmented features."""
    config = params.train_head.label_issues
    started = time.perf_counter()
    parts = [("train", train, plain), ("val", val, arrays["val_x"])]
    if test is not None and "test_x" in arrays:
        parts.append(("test", test, arrays["test_x"]))
    issues = label_issues.find_label_issues(
        np.concatenate([x for _, _, x in parts]),
        np.concatenate([split.labels for _, split, _ in parts]),
        train.classes,
        [path for _, split, _ in parts for path in split.paths],
        config.folds,
        params.project.seed,
        config.max_excluded_fraction if config.action == "exclude" else 0.0,
        [name for name, split, _ in parts for _ in split.paths],
    )
    per_split = ", ".join(f"{n} {s}" for s, n in issues.table["split"].value_counts().items()) or "none"
    print(
        f"label issues: {len(issues.table)} suspect(s) ({per_split}), "
        f"{int(issues.excluded.sum())} training image(s) excluded, {time.perf_counter() - started:.1f} s"
    )
    return issues


def _fit_end_to_end(
    model: Any,
    train: Split,
    val: Split,
    params: Params,
    policy_path: str | Path | None,
    weights: dict[int, float] | None,
    callbacks: list[Any],
) -> dict[str, list[float]]:
    """Train through the frozen backbone on freshly augmented images every epoch."""
    h, size, n = params.train_head, params.model.image_size, len(train.classes)
    _compile(model, h.learning_rate, h.label_smoothing, jit_compile=runtime.jit_compile_default())
    limits = ImageLimits.from_config(params.validate)
    train_ds = make_dataset(
        train, size, h.batch_size, policy_path=policy_path, training=True, seed=params.project.seed, limits=limits
    )
    val_ds = make_dataset(val, size, h.batch_size, cache=True, limits=limits)
    fit = model.fit(
        _one_hot(train_ds, n),
        validation_data=_one_hot(val_ds, n),
        epochs=h.epochs,
        class_weight=weights,
        callbacks=callbacks,
        shuffle=False,
        verbose=runtime.progress_verbosity(),
    )
    return fit.history


def run_train_head(
    params: Params,
    manifest: str | Path,
    policy_path: str | Path | None,
    out_dir: str | Path,
    report_dir: str | Path,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
) -> TrainHeadResult:
    """Train the head, save the full model dir, report curves, log one MLflow run (stage=train_head)."""
    import keras

    from components import backbones

    started = time.perf_counter()
    device = runtime.configure_tensorflow(params.project.seed)
    frame = read_manifest(manifest)
    train = load_split(frame, "train")  # classes: every label in the manifest, sorted
    classes = train.classes
    val = load_split(frame, "val", classes)
    test = load_split(frame, "test", classes)  # only for the suspect-label check: nothing is fitted or chosen on it
    if not len(train) or not len(val):
        raise ValueError(f"{manifest}: need train and val images (have {len(train)} train, {len(val)} val)")
    h, m = params.train_head, params.model
    model, _ = backbones.build_classifier(m, len(classes), h)
    weights = data.class_weights(train.labels, len(classes), h.class_weighting)
    version = hashing.manifest_version(manifest)
    with tracking.stage_run(params.tracking, "train_head", {"data_version": version}) as (
        client,
        run_id,
        experiment_id,
    ):
        tracking.log_params(
            client,
            run_id,
            {
                **{f"model.{k}": v for k, v in m.model_dump().items()},
                **{f"train_head.{k}": v for k, v in h.model_dump().items()},
                "seed": params.project.seed,
                "data_version": version,
                "num_classes": len(classes),
                "train_images": len(train),
                "val_images": len(val),
                "augment_policy_sha256": hashing.file_sha256(policy_path) if policy_path else None,
            },
        )
        tracking.log_dataset(run_id, manifest, frame, version, "training")
        callbacks = _callbacks(params, client, run_id) + snapshots.snapshot_callbacks(
            "train_head", weights_of="head" if h.cached_features else "model"
        )
        checks = DataChecks()
        if h.cached_features:
            history, cache_path = _fit_on_cached_features(
                model,
                train,
                val,
                params,
                manifest,
                policy_path,
                cache_dir,
                weights,
                callbacks,
                checks,
                frame.loc[frame["split"] == "train", "sha256"].tolist(),
                test,
            )
        else:
            history, cache_path = _fit_end_to_end(model, train, val, params, policy_path, weights, callbacks), None
            print("label issues: skipped (they need train_head.cached_features: true)")
            checks.reference = drift.reference_from_model(model, frame, classes, params)
        history = learning_curves.history_frame(history)
        best = learning_curves.best_epoch(history)
        seconds = time.perf_counter() - started
        csv_path, png_path = learning_curves.write_reports(
            history, report_dir, f"train_head: {m.backbone}, frozen backbone"
        )
        run_info = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "stage": "train_head",
            "backbone": m.backbone,
            "alpha": m.alpha,
            "image_size": m.image_size,
            "weights": m.weights,
            "data_version": version,
            "best_epoch": int(best["epoch"]),
            "epochs_run": len(history),
            "val_accuracy": float(best["val_accuracy"]),
            "val_loss": float(best["val_loss"]),
            "seconds": round(seconds, 1),
            "cached_features": h.cached_features,
            "feature_cache": str(cache_path) if cache_path else None,
            "feature_engine": checks.feature_engine,
            "num_classes": len(classes),
            "suspect_label_splits": list(checks.issues.checked_splits) if checks.issues is not None else None,
            "device": device,
            "prefect_flow_run_id": environment().prefect_flow_run_id,
            "settings": {"model": m.model_dump(), "train_head": h.model_dump(), "seed": params.project.seed},
        }
        model_folder.save_model_dir(model, classes, run_info, out_dir)
        TrainingMetrics(
            val_accuracy=run_info["val_accuracy"],
            val_loss=run_info["val_loss"],
            best_epoch=run_info["best_epoch"],
            epochs_run=run_info["epochs_run"],
            seconds=run_info["seconds"],
            train_seconds=run_info["seconds"],
        ).write(Path(report_dir) / "metrics.json")
        _write_data_checks(checks, params, run_info, out_dir, report_dir, client, run_id)
        for name in ("val_accuracy", "val_loss"):
            client.log_metric(run_id, f"best_{name}", run_info[name])
        client.log_metric(run_id, "seconds", seconds)
        client.log_artifact(run_id, str(csv_path))
        tracking.log_picture(client, run_id, png_path, "train_head/curves.png")
    keras.backend.clear_session()
    return TrainHeadResult(
        run_id, run_info["val_accuracy"], run_info["best_epoch"], len(history), seconds, cache_path, Path(out_dir)
    )


def _write_data_checks(
    checks: DataChecks,
    params: Params,
    run_info: dict[str, Any],
    out_dir: str | Path,
    report_dir: str | Path,
    client: Any,
    run_id: str,
) -> None:
    """Drift reference and exclusion list into the model folder; suspect-label reports into report_dir and MLflow."""
    if checks.reference is not None:
        meta = {k: run_info[k] for k in ("run_id", "stage", "backbone", "alpha", "image_size", "data_version")}
        dataclasses.replace(checks.reference, meta=meta).save(Path(out_dir) / drift.REFERENCE_FILE)
    # Always written (a DVC out that evaluate reads): header only when the check did not run, which
    # run.json's suspect_label_splits (None) tells apart from a check that found nothing.
    issues = checks.issues or label_issues.LabelIssues(label_issues.empty_table(), np.zeros(0, dtype=bool), 0)
    csv_path, png_path = label_issues.write_reports(
        issues,
        report_dir,
        ImageLimits.from_config(params.validate),
        params.train_head.label_issues.gallery_images,
    )
    if checks.issues is not None:
        label_issues.write_exclusions(checks.issues, out_dir)
        client.log_metric(run_id, "label_issues", len(checks.issues.table))
        for split in checks.issues.checked_splits:
            client.log_metric(run_id, f"label_issues_{split}", int((checks.issues.table["split"] == split).sum()))
        client.log_metric(run_id, "label_issues_excluded", int(checks.issues.excluded.sum()))
        client.log_artifact(run_id, str(csv_path))
        tracking.log_picture(client, run_id, png_path, f"train_head/{label_issues.GALLERY_FILE}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.train_head", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file")
    parser.add_argument("--manifest", required=True, help="validated manifest (data/validated.csv)")
    parser.add_argument("--policy", required=True, help="augmentation pipeline from the augment stage")
    parser.add_argument("--out-dir", required=True, help="model dir to write (model.keras, classes.json, run.json)")
    parser.add_argument("--report-dir", required=True, help="history.csv and curves.png")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="feature cache (not a DVC output)")
    return parser


@errors.cli_errors("train_head")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        files.ensure_writable(args.out_dir, args.report_dir)  # before training, not after
        result = run_train_head(
            params, args.manifest, args.policy, args.out_dir, args.report_dir, workspace_root() / args.cache_dir
        )
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"train_head: {exc}", file=sys.stderr)
        return 2
    print(
        f"train_head: val_accuracy {result.val_accuracy:.4f} at epoch {result.best_epoch}/{result.epochs_run}, "
        f"{result.seconds:.0f} s -> {result.out_dir} (MLflow run {result.run_id})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
