"""A stage on another work pool (the GPU's): sent by the orchestrating run, run by the worker's `stage_flow`.

Both sides meet through the DVC remote: the orchestrator pushes the stage's inputs and sends the committed
revision with its params.yaml and dvc.lock; the worker checks them out, reproduces the stage and pushes its
outputs with DVC's run-cache entry; the orchestrator's `dvc repro --pull` then restores the stage from the
run-cache instead of training it again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from components.core.config import load_params
from components.core.orchestration_config import OrchestrationConfig
from components.lifecycle import run_forms
from flows.dvc_workspace import (
    check_out,
    committed_text,
    fetch_origin,
    git_revision,
    made_by_flow_run,
    pull_stage_result,
    push_stage_inputs,
    reproduce_on_worker,
    stage_is_current,
)
from flows.limits import StageFailed, StageTimedOut, retry_outages

# Stages that may be sent to a GPU work pool (TP_GPU_DEPLOYMENT names the deployment of stage_flow).
GPU_STAGES = ("finetune",)


@task(name="remote-stage", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_outages)
def run_stage_remotely(stage: str, workdir: str, deployment: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Send one stage to another work pool; its outputs come back through the DVC remote.

    The worker runs the same `dvc repro` on the committed revision with this workspace's params.yaml and
    dvc.lock, then pushes its outputs and DVC's run-cache entry. Here, `dvc repro` then finds the run in
    the run-cache and checks the outputs out instead of training again.
    """
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    root = Path(workdir)
    started = time.monotonic()
    if stage_is_current(stage, root):
        return {"stage": stage, "ran": False, "seconds": round(time.monotonic() - started, 1), "where": "up to date"}
    push_stage_inputs(root, stage, logger)
    parameters = {
        "stage": stage,
        "git_rev": git_revision(root),
        "params_yaml": (root / "params.yaml").read_text(encoding="utf-8"),
        "dvc_lock": (root / "dvc.lock").read_text(encoding="utf-8") if (root / "dvc.lock").exists() else "",
    }
    logger.info("sending stage %s to deployment %s (revision %s)", stage, deployment, parameters["git_rev"][:12])
    remote = run_deployment(deployment, parameters=parameters, timeout=timeout_s)
    check_finished(remote, f"stage '{stage}'", deployment, timeout_s)
    pull_stage_result(root, stage, logger)
    # The stage process records the Prefect flow run that ran it (TP_PREFECT_FLOW_RUN_ID) in its model folder.
    if made_by_flow_run(root, stage) != str(remote.id):
        logger.warning("stage %s: the remote result was not in DVC's run-cache, so it ran here as well", stage)
        return {
            "stage": stage,
            "ran": True,
            "seconds": round(time.monotonic() - started, 1),
            "where": "here (run-cache miss)",
        }
    return {"stage": stage, "ran": True, "seconds": round(time.monotonic() - started, 1), "where": deployment}


def check_finished(remote: Any, what: str, deployment: str, timeout_s: float | None) -> None:
    """A deployment's flow run that `run_deployment` waited for completed; else it is cancelled or reported."""
    if remote.state is None or not remote.state.is_final():
        cancel_flow_run(remote.id)
        raise StageTimedOut(
            f"{what} on deployment {deployment} did not finish within {timeout_s} s "
            f"(orchestration.remote_stage_timeout_s): flow run {remote.id} was cancelled"
        )
    if not remote.state.is_completed():
        raise StageFailed(
            f"{what} on deployment {deployment} ended {remote.state.name} (flow run {remote.id})",
            retryable=remote.state.is_crashed(),  # its infrastructure failed, not the work
        )


def cancel_flow_run(flow_run_id: Any) -> None:
    """Ask Prefect to cancel a flow run (its worker stops it), so a timed-out remote stage frees its GPU."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="the orchestrating run stopped waiting"), force=True)


def run_stage_here(
    stage: str,
    git_rev: str | None,
    params_yaml: str | None,
    dvc_lock: str | None,
    root: Path,
    rules: Any,
    limits: OrchestrationConfig,
) -> None:
    """stage_flow's work once its form passed: check out, pull, reproduce, push (each DVC command bounded).

    The revision and the received params.yaml are checked against the worker's rules before anything is
    written (components/lifecycle/run_forms.py).
    """
    check_out_received(git_rev, params_yaml, dvc_lock, root, rules)
    repro_s = getattr(limits.stage_timeout_s, stage)
    reproduce_on_worker(root, stage, limits.step_timeout_s, repro_s, get_run_logger())


def check_out_received(
    git_rev: str | None, params_yaml: str | None, dvc_lock: str | None, root: Path, rules: Any
) -> None:
    """Make the worker's clone the orchestrator's: its revision, params.yaml and dvc.lock, each checked first."""
    baseline = (root / "params.yaml").read_text(encoding="utf-8")
    if git_rev:
        fetch_origin(root)
        run_forms.check_git_rev(root, git_rev, rules)
        committed = committed_text(root, git_rev, "params.yaml")
        baseline = baseline if committed is None else committed
    if params_yaml is not None:
        run_forms.check_received_params(params_yaml, baseline, root, rules)
    if git_rev:
        check_out(root, git_rev)
    if params_yaml is not None:
        (root / "params.yaml").write_text(params_yaml, encoding="utf-8")
    if dvc_lock:
        (root / "dvc.lock").write_text(dvc_lock, encoding="utf-8")
    load_params(root / "params.yaml")  # fail fast here too
