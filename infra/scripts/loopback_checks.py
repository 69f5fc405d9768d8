"""What the loopback e2e checks after each training run, and how it waits for a run to end.

Run 1 trains everything with finetune on the `gpu` pool, restored here from DVC's run-cache; run 2, with
nothing changed, skips every stage. Each check is recorded (e2e_harness.Checks) with what it saw.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from e2e_harness import Checks, E2EFailure, optional, stage_flow_runs, summary_artifact
from loopback_services import Services

from benchmarks.workspace import dvc

GPU_DEPLOYMENT = "stage/gpu"
TRAINING_DEPLOYMENT = "training/on-demand"


# --------------------------------------------------------------------------- checks
def run_deployment_and_wait(client: Any, label: str, deadline: float, services: Services) -> Any:
    """Create a run of `label` and poll it (and the workers) until it ends or the deadline passes."""
    deployment = client.read_deployment_by_name(label)
    flow_run = client.create_flow_run_from_deployment(deployment.id)
    print(f"  {label}: flow run {flow_run.id}", flush=True)
    last_state = None
    while True:
        services.check_alive()
        flow_run = client.read_flow_run(flow_run.id)
        state = flow_run.state
        if state and state.name != last_state:
            last_state = state.name
            print(f"    {time.strftime('%H:%M:%S')} {state.name}", flush=True)
        if state and state.is_final():
            return flow_run
        if time.monotonic() > deadline:
            raise E2EFailure(f"{label} run {flow_run.id} still {last_state} at the deadline")
        time.sleep(3)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def check_first_run(
    checks: Checks, client: Any, mlflow_client: Any, run: Any, orchestrator: Path, gpu_clone: Path, ids: dict[str, Any]
) -> None:
    checks.check("first run completed", lambda: run.state.is_completed(), lambda: run.state.name)
    stage_runs = [
        r
        for r in stage_flow_runs(client)
        if r.parent_task_run_id and client.read_task_run(r.parent_task_run_id).flow_run_id == run.id
    ]
    ids["stage_flow_runs"] = [str(r.id) for r in stage_runs]
    remote = stage_runs[0] if len(stage_runs) == 1 else None
    checks.check(
        "finetune ran as one `stage` flow run, a child of the training run",
        lambda: remote is not None,
        lambda: f"{len(stage_runs)} stage flow run(s)",
    )
    checks.check(
        "the stage flow run completed on the gpu pool, for finetune",
        lambda: (
            remote.state.is_completed() and remote.work_pool_name == "gpu" and remote.parameters["stage"] == "finetune"
        ),
        lambda: {"state": remote.state.name, "work_pool": remote.work_pool_name, "stage": remote.parameters["stage"]},
    )
    summary = optional(lambda: read_json(orchestrator / "reports" / "run_summary.json")) or {}
    stages = {s["stage"]: s for s in summary.get("stages", [])}
    checks.check(
        "the orchestrator restored finetune from DVC's run-cache",
        lambda: stages["finetune"].get("where") == GPU_DEPLOYMENT,
        lambda: stages["finetune"],
    )
    checks.check(
        "finetune trained in the gpu worker's clone only (checkpoints there, none here)",
        lambda: (
            (gpu_clone / ".checkpoints" / "finetune").is_dir()
            and not (orchestrator / ".checkpoints" / "finetune").exists()
        ),
    )
    checks.check(
        "every stage ran (first run)",
        lambda: len(stages) == 6 and all(s["ran"] for s in stages.values()),
        lambda: {k: s["ran"] for k, s in stages.items()},
    )

    model_name = summary.get("registered_model")
    champion = optional(lambda: mlflow_client.get_model_version_by_alias(model_name, "champion"))
    ids["champion_version"] = champion.version if champion else None
    checks.check(
        "the MLflow server holds a `champion` version",
        lambda: champion is not None,
        lambda: f"{model_name} version {champion.version}",
    )
    finetune_run_id = optional(lambda: read_json(orchestrator / "models" / "finetune" / "run.json")["run_id"])
    ids["finetune_mlflow_run"] = finetune_run_id
    finetune_run = optional(lambda: mlflow_client.get_run(finetune_run_id))
    checks.check(
        "the champion was fine-tuned by the worker's MLflow run",
        lambda: (
            champion.tags.get("finetune_run_id") == finetune_run_id
            and read_json(gpu_clone / "models" / "finetune" / "run.json")["run_id"] == finetune_run_id
            and finetune_run.data.tags.get("stage") == "finetune"
            and finetune_run.info.status == "FINISHED"
        ),
        lambda: {"run": finetune_run_id, "status": finetune_run.info.status},
    )
    in_sync = optional(lambda: dvc(orchestrator, "status", "--cloud").stdout.strip())
    checks.check("the DVC remote holds every output of the run", lambda: "in sync" in in_sync, lambda: in_sync)
    artifact = summary_artifact(client, run.id)
    checks.check(
        "the `training-summary` artifact exists",
        lambda: artifact is not None and "| finetune |" in artifact.data,
        lambda: str(artifact.id) if artifact else "missing",
    )


def check_second_run(
    checks: Checks,
    client: Any,
    mlflow_client: Any,
    run: Any,
    orchestrator: Path,
    model_name: str,
    versions_before: int,
    stage_runs_before: int,
) -> None:
    checks.check("second run completed", lambda: run.state.is_completed(), lambda: run.state.name)
    summary = read_json(orchestrator / "reports" / "run_summary.json")
    checks.check(
        "second run skipped every stage",
        lambda: summary["all_skipped"],
        lambda: {s["stage"]: s["ran"] for s in summary["stages"]},
    )
    artifact = summary_artifact(client, run.id)
    checks.check("second run's summary says nothing changed", lambda: "Nothing changed" in artifact.data)
    checks.check("second run sent nothing to the gpu pool", lambda: len(stage_flow_runs(client)) == stage_runs_before)
    versions = len(mlflow_client.search_model_versions(f"name='{model_name}'"))
    checks.check(
        "second run registered no new model version",
        lambda: versions == versions_before,
        lambda: f"{versions} version(s)",
    )
