"""Stage `finetune`: unfreeze the top of the backbone and train it gently with the head.

BatchNorm layers stay frozen and in inference mode (their statistics were learned on ImageNet
with far larger batches; updating them on small batches wrecks the features). The learning rate
warms up, then follows a cosine decay from `finetune.learning_rate`; early stopping on val restores
the best epoch. Every finished epoch is checkpointed (weights, optimizer, epoch, history, MLflow run
id) in `.checkpoints/finetune/<key of inputs and params>`, outside the DVC outputs, so a killed
run resumes from its last finished epoch; the folder is deleted after success.

After training, the head and the fine-tuned model are scored on val the same way (one view, before
calibration: accuracy first, then log-loss); unless the fine-tuned weights beat the head's, the head's
are kept (`finetune.keep_head_if_not_better`), so a small data set never ends below where it started.
Everything after that is done on the kept model. Then flip test-time augmentation is judged on val
(`finetune.flip_tta`: auto keeps it only when the mean of the image's and its mirror's probabilities
is more accurate than the image's alone); the temperature is then fitted to what the saved model
will output, and a kept TTA is saved inside the model (components.backbones.with_flip_tta), so every
consumer applies it.

The same code runs on CPU and GPU: mixed precision and XLA only with a GPU, and a
MirroredStrategy (global batch = batch_size x replicas) with more than one. It is backend-agnostic
Keras 3: TensorFlow is the default (input through tf.data); with `KERAS_BACKEND=jax` (GPU workers,
which have no TensorFlow) nothing imports TensorFlow, the input is a `keras.utils.PyDataset`
(`components.data.ImageBatches`, same decoding and augmentation policy) and training uses one device.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import (
    calibration,
    data,
    drift,
    errors,
    files,
    hashing,
    label_issues,
    learning_curves,
    model_folder,
    runtime,
    snapshots,
    tracking,
)
from components.config import FinetuneConfig, Params, ParamsError, load_params
from components.contracts import MODEL_FILE, TrainingMetrics, read_manifest
from components.data import Split, load_split
from components.images import ImageLimits
from components.settings import environment, workspace_root

DEFAULT_CHECKPOINT_ROOT = Path(".checkpoints/finetune")  # under workspace_root(): experiments resume too
RUN_ID_FILE = "mlflow_run_id.txt"
EPOCH_LOG = "epochs.csv"


@dataclass(frozen=True)
class FinetuneResult:
    run_id: str
    head_run_id: str | None
    val_accuracy: float
    best_epoch: int
    epochs_run: int
    resumed_at_epoch: int  # 1-based epoch this invocation started with; 1 = fresh start
    trainable_layers: int
    seconds: float
    out_dir: Path
    kept: str = "finetuned"  # "head" when fine-tuning did not beat the head on val


def lr_schedule(config: FinetuneConfig, steps_per_epoch: int) -> Any:
    """Linear warm-up to `learning_rate` over `warmup_epochs`, then cosine decay towards 0."""
    import keras

    warmup = min(config.warmup_epochs, max(config.epochs - 1, 0)) * steps_per_epoch
    decay = max(1, config.epochs * steps_per_epoch - warmup)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=decay)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=decay, warmup_target=config.learning_rate, warmup_steps=warmup
    )


def checkpoint_key(params: Params, manifest: str | Path, policy_path: str | Path | None, head_dir: str | Path) -> str:
    return hashing.content_key(
        {
            "head": hashing.file_sha256(Path(head_dir) / MODEL_FILE),
            "data": hashing.file_sha256(manifest),
            "policy": hashing.file_sha256(policy_path) if policy_path else None,
            "finetune": params.finetune.model_dump(),
            "seed": params.project.seed,
        }
    )


@dataclass(frozen=True)
class _OneDevice:
    """Stands in for tf.distribute's default strategy on other backends: one device, no scope."""

    num_replicas_in_sync: int = 1

    def scope(self) -> Any:
        return contextlib.nullcontext()


def _distribution(device: dict[str, Any]) -> Any:
    import keras

    if keras.config.backend() != "tensorflow":
        if device["gpus"] > 1:
            print(f"finetune: {device['gpus']} GPUs seen; on the {keras.config.backend()} backend one is used")
        return _OneDevice()
    import tensorflow as tf

    return tf.distribute.MirroredStrategy() if device["gpus"] > 1 else tf.distribute.get_strategy()


def _epoch_history(log_path: Path) -> pd.DataFrame:
    """Epochs logged so far, across resumes (a repeated epoch keeps its last row), 1-based."""
    log = pd.read_csv(log_path).drop_duplicates("epoch", keep="last").sort_values("epoch")
    return learning_curves.history_frame(
        {c: log[c].tolist() for c in log.columns if c != "epoch"}, first_epoch=int(log["epoch"].iloc[0]) + 1
    )


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


def _compiled_model(
    head_dir: Path, head_sha256: str, config: FinetuneConfig, steps_per_epoch: int, default_layers: int
) -> tuple[Any, list[str]]:
    """The head model with the top of its backbone unfrozen, compiled (after changing `trainable`)."""
    import keras

    from components import backbones

    model = model_folder.load_keras_model(head_dir / MODEL_FILE, expected_sha256=head_sha256)
    backbone = backbones.find_backbone(model)
    start = backbones.unfreeze_top(backbone, config, default_layers)
    model.compile(
        optimizer=keras.optimizers.Adam(lr_schedule(config, steps_per_epoch)),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=runtime.jit_compile_default(),
    )
    return model, [layer.name for layer in backbone.layers[start:] if layer.trainable]


def _datasets(
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


def _fit_resumable(
    model: Any,
    train_ds: Any,
    val_ds: Any,
    config: FinetuneConfig,
    checkpoint_dir: Path,
    logger: Any,
    extra_callbacks: list[Any],
) -> tuple[pd.DataFrame, int]:
    """Fit with per-epoch backups; return the history of all epochs (across resumes) and the 1-based
    epoch this call started at."""
    import keras

    epochs_seen = _epoch_recorder()
    callbacks = [
        keras.callbacks.BackupAndRestore(str(checkpoint_dir / "state"), double_checkpoint=True),
        keras.callbacks.CSVLogger(str(checkpoint_dir / EPOCH_LOG), append=True),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
        ),
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
    return _epoch_history(checkpoint_dir / EPOCH_LOG), (epochs_seen.epochs[0] if epochs_seen.epochs else 0) + 1


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


def _keep_better(
    model: Any, head_weights: list[np.ndarray], val_ds: Any, labels: np.ndarray, config: FinetuneConfig
) -> tuple[KeptModel, np.ndarray]:
    """Score the fine-tuned weights and the head's on val; leave the kept ones in `model` and return
    the kept model's val views (reused by `_finish_model`)."""
    finetuned_weights, finetuned_views = model.get_weights(), _val_views(model, val_ds)
    model.set_weights(head_weights)
    head_views = _val_views(model, val_ds)
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


def _val_views(model: Any, val_ds: Any) -> np.ndarray:
    """(2, n, classes): the classifier's probabilities on val and on val mirrored, in one pass."""
    from components.backbones import flip_views

    return np.stack([np.asarray(v, np.float64) for v in flip_views(model).predict(val_ds, verbose=0)])


def _calibrate(model: Any, val_views: np.ndarray, val_labels: Any) -> calibration.CalibrationReport:
    """Fit a temperature on val (never test), on the views the saved model will average, and fold it
    into the shared output layer."""
    report = calibration.calibrate(val_views, val_labels)
    calibration.fold_temperature(model, report.temperature)
    print(
        f"finetune: temperature {report.temperature:.3f} fitted on val; "
        f"val ECE {report.ece_before:.4f} -> {report.ece_after:.4f}"
    )
    return report


def _finish_model(
    model: Any, views: np.ndarray, val_labels: np.ndarray, config: FinetuneConfig
) -> tuple[Any, FlipDecision, calibration.CalibrationReport | None]:
    """Decide flip TTA on val (`views`: the model's, from `_val_views`), calibrate what will be saved,
    and wrap the classifier if TTA is kept."""
    from components.backbones import with_flip_tta

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


def _calibration_metrics(report: calibration.CalibrationReport) -> dict[str, float]:
    return {
        "temperature": round(report.temperature, 4),
        "val_ece_before": report.ece_before,
        "val_ece_after": report.ece_after,
    }


def _log_calibration(client: Any, run_id: str, report: calibration.CalibrationReport | None, report_dir: Path) -> None:
    """reports/finetune/calibration.json (always written: a DVC out) and the numbers in MLflow."""
    path = report_dir / "calibration.json"
    files.write_json(
        path, {"calibrated": True, **report.to_dict()} if report else {"calibrated": False, "temperature": 1.0}
    )
    client.log_artifact(run_id, str(path))
    for key, value in (_calibration_metrics(report) if report else {}).items():
        client.log_metric(run_id, key, value)


def run_finetune(
    params: Params,
    manifest: str | Path,
    policy_path: str | Path | None,
    head_dir: str | Path,
    out_dir: str | Path,
    report_dir: str | Path,
    checkpoint_root: str | Path = DEFAULT_CHECKPOINT_ROOT,
    extra_callbacks: list[Any] | None = None,
) -> FinetuneResult:
    """Fine-tune models/head into `out_dir`, resuming an interrupted run with the same inputs and params."""
    import keras

    started = time.perf_counter()
    config, seed, head_dir = params.finetune, params.project.seed, Path(head_dir)
    classes, head_info = model_folder.read_model_info(head_dir)
    image_size = head_info.image_size
    device = runtime.configure_devices(seed)
    frame = read_manifest(manifest)
    excluded = label_issues.read_exclusions(head_dir)  # suspect labels the head left out (action: exclude)
    kept = frame[~((frame["split"] == "train") & frame["path"].isin(excluded))]
    train, val = load_split(kept, "train", classes), load_split(frame, "val", classes)
    if excluded:
        print(f"finetune: {len(excluded)} suspect-label training images left out, as in train_head")
    if not len(train) or not len(val):
        raise ValueError(f"{manifest}: need train and val images (have {len(train)} train, {len(val)} val)")

    checkpoint_dir = Path(checkpoint_root) / checkpoint_key(params, manifest, policy_path, head_dir)
    run_id_path = checkpoint_dir / RUN_ID_FILE
    previous_run = run_id_path.read_text().strip() if run_id_path.is_file() else None
    with tracking.stage_run(
        params.tracking,
        "finetune",
        {"head_run_id": head_info.run_id, "data_version": hashing.manifest_version(manifest)},
        run_id=previous_run,
    ) as (client, run_id, experiment_id):  # ends FAILED on any error: the checkpoint stays, the next run resumes
        checkpoint_dir.mkdir(parents=True, exist_ok=True)  # only now: a run refused at the start leaves nothing
        run_id_path.write_text(run_id)  # a resumed run continues this MLflow run
        strategy = _distribution(device)
        batch_size = config.batch_size * strategy.num_replicas_in_sync
        with strategy.scope():
            from components.backbones import get_spec

            model, trained_layers = _compiled_model(
                head_dir,
                head_info.model_sha256,
                config,
                math.ceil(len(train) / batch_size),
                get_spec(head_info.backbone).default_unfreeze_layers,
            )
        if previous_run is None:
            tracking.log_params(
                client,
                run_id,
                {
                    **{f"finetune.{k}": v for k, v in config.model_dump().items()},
                    "seed": seed,
                    "head_run_id": head_info.run_id,
                    "backbone": head_info.backbone,
                    "image_size": image_size,
                    "global_batch_size": batch_size,
                    "replicas": strategy.num_replicas_in_sync,
                    "trainable_backbone_layers": len(trained_layers),
                    "train_images": len(train),
                    "val_images": len(val),
                    "mixed_precision": device["mixed_precision"],
                },
            )
            tracking.log_dataset(run_id, manifest, frame, hashing.manifest_version(manifest), "training")
        train_ds, val_ds = _datasets(
            train, val, image_size, batch_size, policy_path, seed, ImageLimits.from_config(params.validate)
        )
        device = {
            **device,
            "backend": keras.config.backend(),
            "input_pipeline": "tf.data" if data.uses_tf_data() else "PyDataset",
        }
        labels = np.asarray(val.labels)
        if config.epochs > 0:
            head_weights = model.get_weights()  # before fit: on a resume, BackupAndRestore loads the epoch in fit
            history, resumed_at = _fit_resumable(
                model,
                train_ds,
                val_ds,
                config,
                checkpoint_dir,
                tracking.mlflow_epoch_logger(client, run_id, policy=tracking.RetryPolicy.from_config(params.tracking)),
                extra_callbacks or [],
            )
            best = learning_curves.best_epoch(history)
            val_accuracy, val_loss, best_epoch = (
                float(best["val_accuracy"]),
                float(best["val_loss"]),
                int(best["epoch"]),
            )
            choice, views = _keep_better(model, head_weights, val_ds, labels, config)
        else:  # nothing to train: the head model is the result
            history, resumed_at = learning_curves.history_frame({}), 1
            views = _val_views(model, val_ds)
            choice = KeptModel("head", ValScore.of(views[0], labels), None)
        if choice.kept == "head":  # best_epoch 0: the head's weights, measured with this stage's loss
            val_loss, val_accuracy = model.evaluate(val_ds, verbose=0)
            best_epoch = 0
        model, flip, calibrated = _finish_model(model, views, labels, config)
        seconds = time.perf_counter() - started
        run_info = {
            **head_info.model_dump(include={"backbone", "alpha", "image_size", "weights", "data_version"}),
            "run_id": run_id,
            "experiment_id": experiment_id,
            "stage": "finetune",
            "settings": {**head_info.settings, "finetune": config.model_dump(), "seed": seed},
            "prefect_flow_run_id": environment().prefect_flow_run_id,
            "head_run_id": head_info.run_id,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
            "seconds": round(seconds, 1),
            "device": device,
            "trainable_backbone_layers": len(trained_layers),
            "first_trainable_layer": trained_layers[0] if trained_layers else None,
            "temperature": calibrated.temperature if calibrated else 1.0,
            "flip_tta": flip.applied,
            "val_accuracy_single_view": flip.val_accuracy_single_view,
            "val_accuracy_flip_tta": flip.val_accuracy_flip_tta,
            **choice.run_info(),
        }
        model_folder.save_model_dir(model, classes, run_info, out_dir)
        # Fine-tuning moves the features: the drift check compares new data with this model's own.
        drift.reference_from_model(
            model,
            frame,
            classes,
            params,
            meta={k: run_info[k] for k in ("run_id", "stage", "backbone", "alpha", "image_size", "data_version")},
        ).save(Path(out_dir) / drift.REFERENCE_FILE)
        TrainingMetrics(
            val_accuracy=val_accuracy,
            val_loss=val_loss,
            best_epoch=best_epoch,
            epochs_run=len(history),
            seconds=round(seconds, 1),
            train_seconds=round(seconds + head_info.seconds, 1),
            **flip.metrics(),
            **choice.metrics(),
            **(_calibration_metrics(calibrated) if calibrated else {}),
        ).write(Path(report_dir) / "metrics.json")
        _log_calibration(client, run_id, calibrated, Path(report_dir))
        if len(history):
            title = f"finetune: top {len(trained_layers)} backbone layers"
            csv_path, png_path = learning_curves.write_reports(history, report_dir, title)
            client.log_artifact(run_id, str(csv_path))
            tracking.log_picture(client, run_id, png_path, "finetune/curves.png")
        client.log_metric(run_id, "best_val_accuracy", val_accuracy)
        for key, value in {**flip.metrics(), **choice.metrics()}.items():
            client.log_metric(run_id, key, value)
        client.set_tag(run_id, "finetune.kept", choice.kept)
        client.log_metric(run_id, "seconds", seconds)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    keras.backend.clear_session()
    return FinetuneResult(
        run_id,
        head_info.run_id,
        val_accuracy,
        best_epoch,
        len(history),
        resumed_at,
        len(trained_layers),
        seconds,
        Path(out_dir),
        choice.kept,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file")
    parser.add_argument("--manifest", required=True, help="validated manifest (data/validated.csv)")
    parser.add_argument("--policy", required=True, help="augmentation pipeline from the augment stage")
    parser.add_argument("--head-dir", required=True, help="model dir written by train_head")
    parser.add_argument("--out-dir", required=True, help="model dir to write (model.keras, classes.json, run.json)")
    parser.add_argument("--report-dir", required=True, help="history.csv and curves.png")
    parser.add_argument(
        "--checkpoint-dir",
        default=str(DEFAULT_CHECKPOINT_ROOT),
        help="per-epoch checkpoints for resuming (not a DVC output)",
    )
    return parser


@errors.cli_errors("finetune")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        files.ensure_writable(args.out_dir, args.report_dir)  # before training, not after
        result = run_finetune(
            params,
            args.manifest,
            args.policy,
            args.head_dir,
            args.out_dir,
            args.report_dir,
            workspace_root() / args.checkpoint_dir,
        )
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"finetune: {exc}", file=sys.stderr)
        return 2
    resumed = f", resumed at epoch {result.resumed_at_epoch}" if result.resumed_at_epoch > 1 else ""
    kept = "the head's weights kept" if result.kept == "head" else f"at epoch {result.best_epoch}"
    print(
        f"finetune: val_accuracy {result.val_accuracy:.4f} {kept} ({result.epochs_run} epochs run)"
        f"{resumed}, {result.trainable_layers} backbone layers trained, {result.seconds:.0f} s -> {result.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
