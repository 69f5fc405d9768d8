"""The training flow's tasks: each stage of dvc.yaml, and the steps around them (preflight, drift, export, push).

A stage task runs `dvc repro --single-item <stage>` (flows/dvc_workspace.py) with the timeout, retries and
jittered delays of `orchestration:`; the other steps run a component's CLI through flows/commands.py.
Only outages and killed processes are retried (flows/limits.py's retry_outages).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from components.core import files
from components.core.config import ParamsError
from components.core.orchestration_config import OrchestrationConfig
from components.core.paths import DRIFT_REPORT, EXPORT_DIR, EXPORT_RECORD, FINETUNE_DIR, VALIDATED_MANIFEST
from components.modeling.drift import REFERENCE_FILE, DriftReport
from flows.commands import run_command
from flows.dvc_workspace import STAGES, push_data, reproduce, stage_is_current
from flows.limits import StageFailed, failure, retry_outages
from flows.notify import notify


def component(module: str, *args: str | Path) -> list[str]:
    """The command line of a component's CLI, run by this interpreter."""
    return [sys.executable, "-m", f"components.{module}", *map(str, args)]


@task(name="preflight")
def preflight(workdir: str, params_path: str, timeout_s: float) -> None:
    """Check the settings against the backbone and augmentation library before any stage does work."""
    done = run_command(component("preflight", "--params", params_path), workdir, timeout_s=timeout_s)
    if done.code != 0:
        output = "\n".join(done.lines)
        # Keep preflight's own message, not the libraries' start-up chatter before it.
        raise ParamsError(output[output.find("preflight: ") :].strip().removeprefix("preflight: "))
    get_run_logger().info(done.lines[-1])


@task(name="export-champion", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_outages)
def export_champion(workdir: str, run_id: str, timeout_s: float) -> dict[str, Any]:
    """SavedModel + float16 TFLite of the new champion, checked against Keras, logged to its MLflow run."""
    cmd = component(
        "export",
        "--model-dir",
        FINETUNE_DIR,
        "--out-dir",
        EXPORT_DIR,
        "--manifest",
        VALIDATED_MANIFEST,
        "--split",
        "test",
        "--mlflow-run",
        run_id,
    )
    done = run_command(cmd, workdir, timeout_s=timeout_s, outcome_of="export")
    if done.code != 0:
        raise failure("export of the champion", done.code, done.lines, done.outcome)
    get_run_logger().info(done.lines[-1])
    return files.read_json(Path(workdir) / EXPORT_RECORD)


@task(name="push-data", retries=3, retry_delay_seconds=[10, 30, 90], retry_condition_fn=retry_outages)
def push_to_remote(workdir: str, timeout_s: float) -> dict[str, Any]:
    return push_data(Path(workdir), get_run_logger(), timeout_s)


def _stage_task(stage: str):
    # Timeout, retries and delays come from params.yaml at run time (`stage_task`).
    @task(name=f"stage:{stage}", retry_condition_fn=retry_outages)
    def run(workdir: str, timeout_s: float | None = None, known_current: bool = False) -> dict[str, Any]:
        """`known_current`: the flow's one `dvc status` of the whole pipeline already said so."""
        logger = get_run_logger()
        started = time.monotonic()
        root = Path(workdir)
        if known_current or stage_is_current(stage, root):
            logger.info("stage %s is up to date (dvc status): skipped", stage)
            return {"stage": stage, "ran": False, "seconds": round(time.monotonic() - started, 1)}
        done = reproduce(stage, root, logger, timeout_s)
        if done.code != 0:
            raise failure(f"stage '{stage}'", done.code, done.lines, done.outcome)
        if not stage_is_current(stage, root):
            raise StageFailed(f"stage '{stage}': dvc repro succeeded but dvc status still reports it changed")
        # "ran" = DVC reproduced it: executed here, or restored from DVC's run-cache (same inputs seen before).
        return {"stage": stage, "ran": True, "seconds": round(time.monotonic() - started, 1)}

    return run


STAGE_TASKS = {stage: _stage_task(stage) for stage in STAGES}


def stage_task(stage: str, settings: OrchestrationConfig) -> Any:
    """The stage's task with its timeout, retries and jittered delays from `orchestration:`."""
    retries = getattr(settings.stage_retries, stage)
    return STAGE_TASKS[stage].with_options(
        timeout_seconds=getattr(settings.stage_timeout_s, stage),
        retries=retries,
        retry_delay_seconds=settings.retry_delays_s if retries else 0,
        retry_jitter_factor=settings.retry_jitter_factor,
    )


def step_task(step: Any, settings: OrchestrationConfig) -> Any:
    """Any other task of the flow, bounded by `orchestration.step_timeout_s`, its retries jittered."""
    return step.with_options(timeout_seconds=settings.step_timeout_s, retry_jitter_factor=settings.retry_jitter_factor)


LAST_MODEL = FINETUNE_DIR  # the workspace's last trained model; its drift reference is the baseline


@task(name="drift-check")
def check_drift(workdir: str, params_path: str, timeout_s: float | None = None) -> dict[str, Any] | None:
    """Compare the newly validated images with the last trained model's data (components.drift_check);
    None when there is no earlier model with a reference. The policy (drift.policy) decides retraining."""
    logger = get_run_logger()
    root = Path(workdir)
    if not (root / LAST_MODEL / REFERENCE_FILE).is_file():
        logger.info("drift: no earlier model with a reference: nothing to compare with")
        return None
    cmd = component(
        "drift_check",
        "--params",
        params_path,
        "--model-dir",
        LAST_MODEL,
        "--manifest",
        VALIDATED_MANIFEST,
        "--out",
        DRIFT_REPORT,
    )
    done = run_command(cmd, root, timeout_s=timeout_s)
    if done.code != 0:
        raise StageFailed("drift check failed:\n" + "\n".join(done.lines)[-2000:], retryable=False)
    logger.info(done.lines[-1])
    report = DriftReport.read(root / DRIFT_REPORT)
    if report.drifted and not report.retrain:
        notify("drift", f"new data drifted from the model's training data: {report.reason}")
    return report.model_dump(mode="json")
