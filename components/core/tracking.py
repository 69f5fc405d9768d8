"""A stage's MLflow run (`stage_run`, the one lifecycle every stage uses) and what stages log into it.

A stage's run is MLflow's active run (mlflow.start_run: context tags, system metrics) for exactly the
stage's `with stage_run(...)` block; it nests under the pipeline's parent run (components/core/pipeline_runs.py).
Every MLflow call is retried on transient failures (components/core/tracking_connection.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from components.core.config import TrackingConfig
from components.core.credentials import scrub_credentials
from components.core.pipeline_runs import GIT_REPO_URL_TAG, end_orphaned_runs, git_tags, pipeline_parent, workspace_tag
from components.core.tracking_connection import (
    RetryPolicy,
    TrackingUnavailable,
    probe_server,
    resolve_tracking_uri,
    setup_mlflow,
    use_tracking_uri,
    with_retries,
)


def require_server(tracking: TrackingConfig) -> None:
    """Return once an http(s) tracking server answers (retried); TrackingUnavailable names it, redacted.

    Stages call it before their slow start (TensorFlow, a model load), so an outage is told in seconds. It
    writes nothing: a SQLite store is a local file with no outage to find, and is not created here."""
    uri = use_tracking_uri(resolve_tracking_uri(tracking))
    with_retries("reach the tracking server", probe_server, uri, policy=RetryPolicy.from_config(tracking))


@contextmanager
def stage_run(
    tracking: TrackingConfig, stage: str, tags: dict[str, str] | None = None, run_id: str | None = None
) -> Iterator[tuple[Any, str, str]]:
    """(client, run_id, experiment_id) of the stage's run, MLflow's active run inside the block.

    `mlflow.start_run` nests it under the pipeline's parent run and adds the context tags (user, source,
    git commit, branch and remote: `git_tags`) and, unless `tracking.system_metrics_interval_s` is 0,
    samples CPU, memory, disk, network and GPU (nvidia-ml-py) as `system/...` metrics. `run_id` reopens
    an interrupted run (its system metrics continue their steps). The run ends when the block does,
    FINISHED or, on any exception, FAILED: it never outlives the call (pytest runs stages in one process).
    """
    import mlflow
    from mlflow import MlflowClient

    # Fail before any training when the server is down (TrackingUnavailable names it, redacted).
    policy = RetryPolicy.from_config(tracking)
    experiment_id = with_retries("reach the tracking server", setup_mlflow, tracking, policy=policy)
    client = MlflowClient()
    with_retries("end orphaned runs", end_orphaned_runs, client, experiment_id, run_id, policy=policy)
    sample_every = tracking.system_metrics_interval_s
    if sample_every:
        mlflow.set_system_metrics_sampling_interval(sample_every)  # MLflow reads it from os.environ at start
        mlflow.set_system_metrics_samples_before_logging(1)
    if run_id is None:
        parent = pipeline_parent(client, experiment_id)
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=stage,
            parent_run_id=parent,
            tags={"stage": stage, **workspace_tag(), **git_tags(), **(tags or {})},
            log_system_metrics=bool(sample_every),
        )
    else:
        active = mlflow.start_run(run_id=run_id, log_system_metrics=bool(sample_every))
    run_id = active.info.run_id
    try:
        _scrub_context_tags(client, run_id, active.data.tags)
        yield client, run_id, experiment_id
    except BaseException:
        _end_stage_run(
            client, run_id, "FAILED", RetryPolicy(attempts=1, first_wait_s=0)
        )  # best effort: the error is what counts
        raise
    _end_stage_run(client, run_id, "FINISHED", policy)


def _scrub_context_tags(client: Any, run_id: str, tags: dict[str, str]) -> None:
    """MLflow's own git context (from the main script's repository) may carry a remote URL with credentials."""
    url = tags.get(GIT_REPO_URL_TAG)
    if url and scrub_credentials(url) != url:
        client.set_tag(run_id, GIT_REPO_URL_TAG, scrub_credentials(url))


def _end_stage_run(client: Any, run_id: str, status: str, policy: RetryPolicy) -> None:
    """Mark the run ended (retried), then pop it off MLflow's active-run stack and stop its metrics sampler.

    mlflow.end_run pops the run before it calls the server, so retrying it would retry nothing: the
    status goes through the client first; end_run then only repeats it, and must run whatever happened.
    """
    import mlflow

    try:
        with_retries("end the run", client.set_terminated, run_id, status, policy=policy)
    except Exception:
        if status == "FINISHED":
            raise
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            try:
                mlflow.end_run(status)
            except Exception:  # the status is (or could not be) set above; the stack is popped either way
                pass


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(flat), 100):
        client.log_batch(run_id, params=flat[i : i + 100])


def mlflow_epoch_logger(
    client: Any, run_id: str, first_epoch: int = 1, policy: RetryPolicy = RetryPolicy.default()
) -> Any:
    """A Keras callback logging every epoch's metrics with step = epoch (1-based).

    Calls are retried like every other MLflow call; an epoch whose metrics still cannot be logged is
    reported and training goes on (they are in the stage's history.csv either way): a slow tracking
    server costs at most the retry budget per epoch, never the training run.
    """
    import keras
    from mlflow.entities import Metric

    class _Logger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            now = int(time.time() * 1000)
            metrics = [
                Metric(k, float(v), now, epoch + first_epoch)
                for k, v in (logs or {}).items()
                if np.isscalar(v) or getattr(v, "shape", None) == ()
            ]
            try:
                with_retries("log the epoch's metrics", client.log_batch, run_id, metrics=metrics, policy=policy)
            except TrackingUnavailable as exc:
                print(f"warning: epoch {epoch + first_epoch} metrics not logged to MLflow ({exc}); training goes on")

    return _Logger()


def training_dataset(manifest: str | Path, frame: Any, version: str) -> Any:
    """The manifest rows a run used as an MLflow dataset ("which data trained or tested this model").

    The digest is the data version (the manifest's content hash), the source the manifest's path, so
    the MLflow UI shows the same identity DVC and the model card use.
    """
    import mlflow.data
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    columns = [c for c in ("path", "label", "split", "sha256") if c in frame.columns]
    source = resolve_dataset_source(str(Path(manifest).resolve()))
    return mlflow.data.from_pandas(
        frame[columns], source=source, targets="label", name=Path(manifest).name, digest=version[:36]
    )


def log_dataset(run_id: str, manifest: str | Path, frame: Any, version: str, context: str) -> Any:
    """Log the manifest rows as the active stage run's dataset input (`context`: training, evaluation); return it.

    mlflow.log_input writes to the active run, or starts one: refused unless `run_id` is the active run.
    """
    import mlflow

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError(f"log_dataset: run {run_id} is not the active run (use it inside tracking.stage_run)")
    dataset = training_dataset(manifest, frame, version)
    mlflow.log_input(dataset, context=context)
    return dataset


def log_picture(client: Any, run_id: str, png: str | Path, artifact_file: str | None = None) -> None:
    """A PNG report as an MLflow image (shown in the run's images, not only as a file)."""
    from PIL import Image

    with Image.open(png) as picture:
        client.log_image(run_id, picture.convert("RGB"), artifact_file=artifact_file or Path(png).name)
