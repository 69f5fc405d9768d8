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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core import errors, files, hashing, runtime, tracking
from components.core.config import Params, ParamsError, load_params
from components.core.paths import TrainHeadPaths
from components.core.settings import environment, workspace_root
from components.core.training_metrics import TrainingMetrics
from components.modeling import data_checks, head_training, learning_curves, model_folder
from components.modeling.head_training import HeadData


@dataclass(frozen=True)
class TrainHeadResult:
    run_id: str
    val_accuracy: float
    best_epoch: int
    epochs_run: int
    seconds: float
    feature_cache: Path | None
    out_dir: Path
    head: str = "adam"  # the head kept: adam (at best_epoch) | lbfgs (the linear head, fitted after the Adam epochs)


def run_train_head(params: Params, paths: TrainHeadPaths) -> TrainHeadResult:
    """Train the head, save the full model dir, report curves, log one MLflow run (stage=train_head)."""
    started = time.perf_counter()
    inputs = HeadData.read(paths.manifest)
    h, m = params.train_head, params.model
    version = hashing.manifest_version(paths.manifest)
    # The tracking server is reached before TensorFlow is imported: a stage refused for an outage says so in
    # a second or two, not after ten of start-up.
    with tracking.stage_run(params.tracking, "train_head", {"data_version": version}) as (
        client,
        run_id,
        experiment_id,
    ):
        import keras

        from components.modeling import backbones

        device = runtime.configure_tensorflow(params.project.seed)
        model, _ = backbones.build_classifier(m, len(inputs.classes), h)
        tracking.log_params(client, run_id, _logged_params(params, inputs, version, paths.policy))
        tracking.log_dataset(run_id, paths.manifest, inputs.frame, version, "training")
        callbacks = head_training.callbacks(params, client, run_id)
        fit = head_training.fit_on_cached_features if h.cached_features else head_training.fit_end_to_end
        fitted = fit(model, inputs, params, paths, callbacks)
        history = learning_curves.history_frame(fitted.history)
        best = learning_curves.best_epoch(history)
        kept = fitted.solver or {"kept": "adam", **{k: float(best[k]) for k in ("val_accuracy", "val_loss")}}
        seconds = time.perf_counter() - started
        checks = fitted.checks
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
            "val_accuracy": float(kept["val_accuracy"]),  # the head kept: Adam's best epoch or the linear head
            "val_loss": float(kept["val_loss"]),
            "head_solver": fitted.solver,
            "seconds": round(seconds, 1),
            "cached_features": h.cached_features,
            "feature_cache": str(fitted.feature_cache) if fitted.feature_cache else None,
            "feature_engine": checks.feature_engine,
            "num_classes": len(inputs.classes),
            "suspect_label_splits": list(checks.issues.checked_splits) if checks.issues is not None else None,
            "device": {**device, "feature_replicas": checks.feature_replicas},
            "prefect_flow_run_id": environment().prefect_flow_run_id,
            "settings": {"model": m.model_dump(), "train_head": h.model_dump(), "seed": params.project.seed},
        }
        model_folder.save_model_dir(model, inputs.classes, run_info, paths.out_dir)
        TrainingMetrics(
            val_accuracy=run_info["val_accuracy"],
            val_loss=run_info["val_loss"],
            best_epoch=run_info["best_epoch"],
            epochs_run=run_info["epochs_run"],
            seconds=run_info["seconds"],
            train_seconds=run_info["seconds"],
        ).write(paths.report_dir / "metrics.json")
        data_checks.write_data_checks(checks, params, run_info, paths.out_dir, paths.report_dir, client, run_id)
        for name in ("val_accuracy", "val_loss"):
            client.log_metric(run_id, f"best_{name}", run_info[name])
        if fitted.solver is not None:
            tracking.log_params(client, run_id, {"head_solver_kept": fitted.solver["kept"]})
            client.log_metric(run_id, "linear_head_C", fitted.solver["lbfgs"]["C"])
        client.log_metric(run_id, "seconds", seconds)
        learning_curves.report(
            client, run_id, history, paths.report_dir, "train_head", f"{m.backbone}, frozen backbone"
        )
    keras.backend.clear_session()
    return TrainHeadResult(
        run_id,
        run_info["val_accuracy"],
        run_info["best_epoch"],
        len(history),
        seconds,
        fitted.feature_cache,
        paths.out_dir,
        kept["kept"],
    )


def _logged_params(params: Params, inputs: HeadData, version: str, policy: Path) -> dict[str, Any]:
    """The run's MLflow params: the settings that shaped the model and the data it saw."""
    return {
        **{f"model.{k}": v for k, v in params.model.model_dump().items()},
        **{f"train_head.{k}": v for k, v in params.train_head.model_dump().items()},
        "seed": params.project.seed,
        "data_version": version,
        "num_classes": len(inputs.classes),
        "train_images": len(inputs.train),
        "val_images": len(inputs.val),
        "augment_policy_sha256": hashing.file_sha256(policy) if policy else None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.train_head", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file")
    TrainHeadPaths.add_arguments(parser)
    return parser


@errors.cli_errors("train_head")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = TrainHeadPaths.from_args(args)
    # The feature cache is workspace-wide: DVC experiments reuse the main workspace's.
    paths = paths.model_copy(update={"cache_dir": workspace_root() / paths.cache_dir})
    try:
        params = load_params(args.params)
        files.ensure_writable(paths.out_dir, paths.report_dir)  # before training, not after
        result = run_train_head(params, paths)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"train_head: {exc}", file=sys.stderr)
        return 2
    print(
        f"train_head: val_accuracy {result.val_accuracy:.4f} "
        + ("(linear head), " if result.head == "lbfgs" else f"at epoch {result.best_epoch}/{result.epochs_run}, ")
        + f"{result.seconds:.0f} s -> {result.out_dir} (MLflow run {result.run_id})"
    )
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
