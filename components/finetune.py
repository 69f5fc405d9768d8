"""Stage `finetune`: unfreeze the top of the backbone and train it gently with the head.

BatchNorm layers stay frozen and in inference mode (their statistics were learned on ImageNet
with far larger batches; updating them on small batches wrecks the features). The learning rate
warms up, then follows a cosine decay from `finetune.learning_rate`; early stopping on val restores
the best epoch. Every finished epoch is checkpointed (components.modeling.checkpoints), so a killed run
resumes from its last finished epoch.

After training, the head and the fine-tuned model are scored on val and the better weights are kept;
flip and crop test-time augmentation and the temperature are decided on val too (components.modeling.model_choice).
Everything after that is done on the kept model.

The same code runs on CPU and GPU: mixed precision and XLA only with a GPU, and with several accelerators
data parallel over all of them (`finetune.data_parallel`, components.modeling.distribution: MirroredStrategy on
TensorFlow, keras DataParallel on JAX); `finetune.batch_size` is the global batch, split across the replicas.
It is backend-agnostic Keras 3: TensorFlow is the default (input through tf.data); with `KERAS_BACKEND=jax`
(GPU workers, which have no TensorFlow) nothing imports TensorFlow and the input is a `keras.utils.PyDataset`
(`components.modeling.data.ImageBatches`, same decoding and augmentation policy).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.core import errors, files, hashing, runtime, tracking
from components.core.config import Params, ParamsError, load_params
from components.core.contracts import ModelRunInfo, read_manifest
from components.core.paths import FinetunePaths
from components.core.settings import environment, workspace_root
from components.core.tracking_connection import RetryPolicy
from components.core.training_metrics import TrainingMetrics
from components.ingestion.images import ImageLimits
from components.modeling import data, distribution, drift, fine_tuning, learning_curves, model_choice, model_folder
from components.modeling.checkpoints import CHECKPOINT_ROOT, Checkpoint
from components.modeling.data import Split, load_split
from components.modeling.model_choice import KeptModel, ValScore
from components.quality import label_issues


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


def run_finetune(
    params: Params,
    paths: FinetunePaths,
    *,
    checkpoint_root: str | Path = CHECKPOINT_ROOT,
    extra_callbacks: list[Any] | None = None,
) -> FinetuneResult:
    """Fine-tune models/head into `paths.out_dir`, resuming an interrupted run with the same inputs and params."""
    started = time.perf_counter()
    config, seed = params.finetune, params.project.seed
    classes, head_info = model_folder.read_model_info(paths.head_dir)
    frame = read_manifest(paths.manifest)
    excluded = label_issues.read_exclusions(paths.head_dir)  # suspect labels the head left out (action: exclude)
    kept = frame[~((frame["split"] == "train") & frame["path"].isin(excluded))]
    train, val = load_split(kept, "train", classes), load_split(frame, "val", classes)
    if excluded:
        print(f"finetune: {len(excluded)} suspect-label training images left out, as in train_head")
    if not len(train) or not len(val):
        raise ValueError(f"{paths.manifest}: need train and val images (have {len(train)} train, {len(val)} val)")
    config = fine_tuning.for_data(config, train)  # the peak learning rate for this many images per class
    fine_tuning.check_low_res_size(config, head_info.image_size)
    print(f"finetune: peak learning rate {config.learning_rate:g} for {len(train)} training images")

    checkpoint = Checkpoint.of(checkpoint_root, params, paths)
    previous_run = checkpoint.previous_run_id()
    version = hashing.manifest_version(paths.manifest)
    with tracking.stage_run(
        params.tracking, "finetune", {"head_run_id": head_info.run_id, "data_version": version}, run_id=previous_run
    ) as (client, run_id, experiment_id):  # ends FAILED on any error: the checkpoint stays, the next run resumes
        import keras  # after the tracking server answered: an outage is reported before the ~10 s TensorFlow start

        device = runtime.configure_devices(seed)
        checkpoint.start(run_id)
        plan = distribution.replica_plan(config.data_parallel)
        distribution.announce(plan, "finetune")
        batch_size = plan.global_batch(config.batch_size, "finetune.batch_size")
        with plan.scope():  # variables created (and compiled) on every replica
            model, trained_layers = fine_tuning.compiled_model(
                paths.head_dir, head_info, config, math.ceil(len(train) / batch_size)
            )
        if previous_run is None:
            logged = _logged_params(params, head_info, batch_size, plan, trained_layers, train, val, device)
            tracking.log_params(client, run_id, logged)
            tracking.log_dataset(run_id, paths.manifest, frame, version, "training")
        limits = ImageLimits.from_config(params.validate)
        training = fine_tuning.TrainingInput(train, batch_size, paths.policy, seed, limits, plan, config.mixup_alpha)
        train_ds, val_ds = fine_tuning.datasets(training, val, head_info.image_size)
        device = {
            **device,
            "backend": keras.config.backend(),
            "input_pipeline": "tf.data" if data.uses_tf_data() else "PyDataset",
            **plan.facts(),
        }
        labels = np.asarray(val.labels)
        if config.epochs > 0:
            head_weights = model.get_weights()  # before fit: on a resume, BackupAndRestore loads the epoch in fit
            low_res = fine_tuning.low_res_first(model, config, head_info.image_size, training, checkpoint)
            with plan.scope():  # trained on every replica (under JAX, the scoring below runs on one device)
                history, resumed_at = fine_tuning.fit_resumable(
                    model,
                    train_ds,
                    val_ds,
                    config,
                    checkpoint,
                    tracking.mlflow_epoch_logger(client, run_id, policy=RetryPolicy.from_config(params.tracking)),
                    extra_callbacks or [],
                    plan,
                )
            best = learning_curves.best_epoch(history)
            val_accuracy, val_loss, best_epoch = (
                float(best["val_accuracy"]),
                float(best["val_loss"]),
                int(best["epoch"]),
            )
            choice, views = model_choice.keep_better(model, head_weights, val_ds, labels, config)
        else:  # nothing to train: the head model is the result
            history, resumed_at, low_res = learning_curves.history_frame({}), 1, None
            views = model_choice.val_views(model, val_ds, config.crop_tta != "off")
            choice = KeptModel("head", ValScore.of(views[0], labels), None)
        if choice.kept == "head":  # best_epoch 0: the head's weights, measured with this stage's loss
            val_loss, val_accuracy = model.evaluate(val_ds, verbose=0)
            best_epoch = 0
        model, flip, crop, calibrated = model_choice.finish_model(model, views, labels, config)
        crop_metrics = crop.metrics() if crop else {}
        seconds = time.perf_counter() - started
        run_info = {
            **head_info.model_dump(include={"backbone", "alpha", "image_size", "weights", "data_version"}),
            "run_id": run_id,
            "experiment_id": experiment_id,
            "stage": "finetune",
            "settings": {**head_info.settings, "finetune": params.finetune.model_dump(), "seed": seed},
            "prefect_flow_run_id": environment().prefect_flow_run_id,
            "head_run_id": head_info.run_id,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
            "seconds": round(seconds, 1),
            "device": device,
            "trainable_backbone_layers": len(trained_layers),
            "peak_learning_rate": config.learning_rate,
            "low_res_phase": low_res,  # None: off, or a resumed run that had finished it
            "first_trainable_layer": trained_layers[0] if trained_layers else None,
            "temperature": calibrated.temperature if calibrated else 1.0,
            "flip_tta": flip.applied or bool(crop and crop.applied),  # crop TTA averages the mirrors too
            "val_accuracy_single_view": flip.val_accuracy_single_view,
            "val_accuracy_flip_tta": flip.val_accuracy_flip_tta,
            **choice.run_info(),
            "val_images": len(labels),
            **model_choice.crop_run_info(crop),
            "val_intervals": {
                **choice.val_intervals(),
                **flip.val_intervals(),
                **(crop.val_intervals() if crop else {}),
            },
        }
        model_folder.save_model_dir(model, classes, run_info, paths.out_dir)
        # Fine-tuning moves the features: the drift check compares new data with this model's own.
        reference = drift.reference_from_model(model, frame, classes, params, meta=drift.reference_meta(run_info))
        reference.save(paths.out_dir / drift.REFERENCE_FILE)
        TrainingMetrics(
            val_accuracy=val_accuracy,
            val_loss=val_loss,
            best_epoch=best_epoch,
            epochs_run=len(history),
            seconds=round(seconds, 1),
            train_seconds=round(seconds + head_info.seconds, 1),
            **flip.metrics(),
            **crop_metrics,
            **choice.metrics(),
            **model_choice.calibration_metrics(calibrated),
        ).write(paths.report_dir / "metrics.json")
        model_choice.log_calibration(client, run_id, calibrated, paths.report_dir)
        if len(history):
            title = f"top {len(trained_layers)} backbone layers"
            learning_curves.report(client, run_id, history, paths.report_dir, "finetune", title)
        client.log_metric(run_id, "best_val_accuracy", val_accuracy)
        for key, value in {**flip.metrics(), **crop_metrics, **choice.metrics()}.items():
            client.log_metric(run_id, key, value)
        client.set_tag(run_id, "finetune.kept", choice.kept)
        client.log_metric(run_id, "seconds", seconds)
    checkpoint.remove()
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
        paths.out_dir,
        choice.kept,
    )


def _logged_params(
    params: Params,
    head_info: ModelRunInfo,
    batch_size: int,
    plan: distribution.ReplicaPlan,
    trained_layers: list[str],
    train: Split,
    val: Split,
    device: dict[str, Any],
) -> dict[str, Any]:
    """The run's MLflow params (logged once: a resumed run keeps them)."""
    return {
        **{f"finetune.{k}": v for k, v in params.finetune.model_dump().items()},
        "seed": params.project.seed,
        "head_run_id": head_info.run_id,
        "backbone": head_info.backbone,
        "image_size": head_info.image_size,
        "global_batch_size": batch_size,
        "replicas": plan.replicas,
        "data_parallel": plan.kind,
        "trainable_backbone_layers": len(trained_layers),
        "peak_learning_rate": fine_tuning.for_data(params.finetune, train).learning_rate,
        "train_images": len(train),
        "val_images": len(val),
        "mixed_precision": device["mixed_precision"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file")
    FinetunePaths.add_arguments(parser)
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=CHECKPOINT_ROOT,
        help=f"per-epoch checkpoints for resuming (not a DVC output; default: {CHECKPOINT_ROOT})",
    )
    return parser


@errors.cli_errors("finetune")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = FinetunePaths.from_args(args)
    try:
        params = load_params(args.params)
        files.ensure_writable(paths.out_dir, paths.report_dir)  # before training, not after
        # Checkpoints are workspace-wide: a DVC experiment resumes in the main workspace's folder.
        result = run_finetune(params, paths, checkpoint_root=workspace_root() / args.checkpoint_dir)
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
    runtime.exit_process(main())
