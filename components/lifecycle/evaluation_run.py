"""The evaluation's MLflow run: the test split as its dataset input, settings, test metrics, the served
model with the metrics linked to it (MLflow 3 LoggedModel), and the report folder's files and figures.

The run nests under the pipeline's parent run and carries the workspace and git tags (`tracking.stage_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from components.core import hashing, tracking
from components.core.config import Params
from components.core.contracts import read_manifest
from components.core.tracking_connection import RetryPolicy, shown_uri, with_retries
from components.lifecycle import model_packaging
from components.modeling.frozen_forward import FrozenRunner
from components.modeling.metrics import flat_metrics, mlflow_key
from components.modeling.model_folder import ModelFolder
from components.scoring import scoring
from components.scoring.evaluation_plots import FIGURES


def log_evaluation(
    params: Params,
    folder: ModelFolder,
    metrics: dict[str, Any],
    lineage: dict[str, str],
    example: pd.DataFrame | None,
    manifest: str | Path,
    policy: RetryPolicy,
    runner: FrozenRunner | None = None,
) -> tuple[str, str | None, str | None]:
    """The evaluation run (test split as dataset input, settings, metrics) and, given an example, the served
    model with the metrics linked to it (MLflow 3 LoggedModel): (run id, model URI, the logged folder's digest).

    The digest (`scoring.logged_tree_digest`, every file of the logged model) is read back from the store
    right after logging, trusting it for that moment; registration records it as `model_tree_sha256`.

    The run carries the tag `inference_engine` (what scored the test split). When that was ONNX Runtime,
    the served model carries the same checked ONNX file."""
    engine = runner.engine if runner is not None else "keras"
    onnx = runner.accepted_export if runner is not None else None
    with tracking.stage_run(params.tracking, "evaluate", {**lineage, "inference_engine": engine}) as (
        client,
        run_id,
        _,
    ):
        frame = read_manifest(manifest)
        test_split = with_retries(
            "log the test split",
            tracking.log_dataset,
            run_id,
            manifest,
            frame[frame["split"] == "test"],
            hashing.manifest_version(manifest),
            "evaluation",
            policy=policy,
        )
        with_retries("log params", tracking.log_params, client, run_id, logged_settings(params, folder), policy=policy)
        if example is None:  # an experiment that does not register: metrics and reports only
            log_test_metrics(client, run_id, metrics, None, test_split, policy)
            return run_id, None, None
        config = model_packaging.serving_model_config(
            params, folder.image_size, folder.info.model_sha256, onnx.sha256 if onnx else None
        )
        info = with_retries(  # into the active run: the stage run
            "log the model",
            model_packaging.log_pyfunc,
            folder.model_path,
            folder.classes,
            config,
            example,
            onnx.path if onnx else None,
            policy=policy,
        )
        tree_sha256 = scoring.logged_tree_digest(info.model_uri, policy)
        log_test_metrics(client, run_id, metrics, info.model_id, test_split, policy)
    return run_id, info.model_uri, tree_sha256


def logged_settings(params: Params, folder: ModelFolder) -> dict[str, Any]:
    """The run's params: evaluate's settings, the gate's, serving's, and the model's input size and classes."""
    return {
        **{f"evaluate.{k}": v for k, v in params.evaluate.model_dump().items() if k not in ("promotion", "serving")},
        **{f"promotion.{k}": v for k, v in params.evaluate.promotion.model_dump().items()},
        **{f"serving.{k}": v for k, v in params.evaluate.serving.model_dump().items()},
        "image_size": folder.image_size,
        "n_classes": len(folder.classes),
        "tracking_server": shown_uri(),
    }


def log_test_metrics(
    client: Any, run_id: str, metrics: dict[str, Any], model_id: str | None, dataset: Any, policy: RetryPolicy
) -> None:
    """The test metrics on the run, each naming the dataset that produced them (the test split's name and
    digest, as logged as the run's input) and, given a model id, on the logged model too (its Models tab row)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    logged = [
        Metric(
            mlflow_key(k),
            float(v),
            now,
            0,
            model_id=model_id,
            dataset_name=dataset.name,
            dataset_digest=dataset.digest,
        )
        for k, v in flat_metrics(metrics).items()
    ]
    for start in range(0, len(logged), 1000):  # MLflow's log_batch limit
        with_retries("log metrics", client.log_batch, run_id, metrics=logged[start : start + 1000], policy=policy)


def log_reports(run_id: str, report: Path, policy: RetryPolicy) -> None:
    """Every report file, the card and decision included (they exist only after registration), and the
    figures as MLflow images as well (the run's image view, not only its files)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in sorted(report.iterdir()):
        if path.is_file():
            with_retries(f"upload {path.name}", client.log_artifact, run_id, str(path), "evaluate", policy=policy)
    for name in FIGURES:
        if (report / name).is_file():
            with_retries(
                f"log image {name}",
                tracking.log_picture,
                client,
                run_id,
                report / name,
                f"figures/{name}",
                policy=policy,
            )
