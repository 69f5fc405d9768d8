"""What a training run records beside the stages' outputs: its MLflow parent run, and its Prefect artifacts.

One MLflow parent run per flow run (the stage processes nest theirs under it), a progress bar, the test
metrics per class and links to the MLflow run and model version; and whether the promotion in the
workspace is this run's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from components.core.config import Params
from components.core.contracts import PromotionRecord
from flows import summary
from flows.dvc_workspace import STAGES
from flows.stage_tasks import step_task

PARENT_RUN_VARIABLE = "TP_MLFLOW_PARENT_RUN_ID"  # read by the stage processes (components/core/settings.py)


# MLflow calls are retried by the tracking retry policy (tracking.retry_attempts), not a second time by Prefect.
@task(name="mlflow-pipeline-run")
def open_pipeline_run(tracking: dict[str, Any], workdir: str, experiment: str | None) -> str:
    """One MLflow parent run per flow run: the stage runs nest under it (one row per pipeline run)."""
    from components.core.config import TrackingConfig
    from components.core.pipeline_runs import start_pipeline_run

    tags = {
        "prefect_flow_run_id": str(flow_run.get_id() or ""),
        **({"dvc_experiment": experiment} if experiment else {}),
    }
    name = f"pipeline {flow_run.get_name() or ''}".strip()
    return start_pipeline_run(TrackingConfig(**tracking), name, tags, workspace=workdir)[1]


@task(name="mlflow-pipeline-run-end")
def close_pipeline_run(
    tracking: dict[str, Any],
    workdir: str,
    run_id: str,
    status: str,
    tags: dict[str, str],
    artifacts: list[str] | None = None,
) -> None:
    from mlflow import MlflowClient

    from components.core.config import TrackingConfig
    from components.core.tracking_connection import RetryPolicy, setup_mlflow, with_retries

    config = TrackingConfig(**tracking)
    policy = RetryPolicy.from_config(config)
    with_retries("reach the tracking server", setup_mlflow, config, workdir, policy=policy)
    client = MlflowClient()
    for key, value in tags.items():
        with_retries("tag the pipeline run", client.set_tag, run_id, key, value, policy=policy)
    for artifact in artifacts or []:
        with_retries("log an artifact", client.log_artifact, run_id, str(Path(workdir) / artifact), policy=policy)
    with_retries("end the pipeline run", client.set_terminated, run_id, status, policy=policy)


@contextmanager
def pipeline_run(params: Params, root: Path, experiment: str | None) -> Iterator[str]:
    """The flow run's MLflow parent run (its id) for the block: ended FAILED if the block raises; ending it
    FINISHED, with the run's tags, is the caller's (`finish_pipeline_run`)."""
    tracking = params.tracking.model_dump()
    parent = step_task(open_pipeline_run, params.orchestration)(tracking, str(root), experiment)
    os.environ[PARENT_RUN_VARIABLE] = parent  # stage processes nest their MLflow runs under it
    try:
        yield parent
    except BaseException:
        step_task(close_pipeline_run, params.orchestration)(tracking, str(root), parent, "FAILED", {})
        raise
    finally:
        os.environ.pop(PARENT_RUN_VARIABLE, None)


def finish_pipeline_run(
    params: Params, root: Path, parent: str, outcomes: list[dict[str, Any]], artifacts: list[str] | None = None
) -> None:
    """End the parent run FINISHED, tagged with the stages that ran, with the run's `artifacts` logged."""
    ran = ",".join(o["stage"] for o in outcomes if o["ran"]) or "none"
    tracking = params.tracking.model_dump()
    step_task(close_pipeline_run, params.orchestration)(
        tracking, str(root), parent, "FINISHED", {"stages_run": ran}, artifacts or []
    )


def promoted_by_this_run(promotion: PromotionRecord | None) -> bool:
    """A promotion is this run's only if this flow run registered it: a run-cache restore of evaluate
    brings back an old promotion.json, which must not be exported or announced again."""
    this_run = str(flow_run.get_id() or "")
    return bool(
        promotion and promotion.promoted and this_run and promotion.lineage.get("prefect_flow_run_id") == this_run
    )


def start_progress(description: str) -> Any:
    """The run's progress artifact (Prefect's UI shows it as a bar on the flow run), at 0 %."""
    return create_progress_artifact(0.0, key="training-progress", description=description)


def report_progress(progress: Any, done: int, stage: str) -> None:
    """`done` of the six stages are behind the run, the last one `stage`."""
    update_progress_artifact(progress, 100.0 * done / len(STAGES), f"stage {done} of {len(STAGES)}: {stage}")


def publish_artifacts(root: Path, tracking: dict[str, Any], result: dict[str, Any], logger: Any) -> None:
    """The test metrics per class (a table) and links to the MLflow run and model version, in Prefect's UI."""
    rows = summary.per_class_rows(result.get("metrics") or {})
    if rows:
        create_table_artifact(
            table=rows, key="test-metrics-per-class", description="Test precision, recall and F1 of each class"
        )
    try:
        links = summary.tracking_links(tracking, str(root), result.get("mlflow_run_id"), result.get("promotion"))
    except Exception as error:  # a link is a convenience: never fail a finished run over it
        logger.warning("no MLflow links for this run: %s", type(error).__name__)
        return
    for link in links:
        create_link_artifact(**link)
