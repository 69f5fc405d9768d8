"""What `make e2e-docker` checks after its first training run, and its report in markdown.

The first run must complete after the gpu worker was killed mid-fine-tune and the retried stage resumed
from its checkpoint; the champion, its artifacts in the object store and the role keys' limits are checked
on the running stack.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from docker_images import IMAGES
from docker_stack import FINETUNE_EPOCHS, Stack
from e2e_harness import Checks, E2EFailure, optional, stage_flow_runs, summary_artifact


def flow_run_logs(client: Any, flow_run_id: Any) -> list[str]:
    """Every log line of a flow run (its tasks included), oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    lines: list[str] = []
    for offset in range(0, 20000, 200):
        page = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
            limit=200,
            offset=offset,
            sort=LogSort.TIMESTAMP_ASC,
        )
        lines += [f"{entry.timestamp:%H:%M:%S} {logging_level(entry.level)} {entry.message}" for entry in page]
        if len(page) < 200:
            break
    return lines


def logging_level(level: int) -> str:
    import logging

    return logging.getLevelName(level)


def role_client(credentials: str, endpoint: str) -> Any:
    import configparser

    import boto3
    from botocore.config import Config

    parser = configparser.ConfigParser()
    parser.read_string(credentials)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        **dict(parser["default"]),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def refused(call: Callable[[], Any]) -> bool:
    try:
        call()
        return False
    except Exception as error:  # botocore ClientError
        return getattr(error, "response", {}).get("Error", {}).get("Code") in {"AccessDenied", "403", "Forbidden"}


def check_first_run(
    checks: Checks,
    client: Any,
    mlflow_client: Any,
    run_: Any,
    stack: Stack,
    killed: dict[str, Any],
    report: dict[str, Any],
    s3_url: str,
    tmp: Path,
) -> None:
    ids = report["ids"]
    completed = checks.check(
        "first run completed",
        lambda: run_.state.is_completed(),
        lambda: f"{run_.state.name}: {(run_.state.message or '')[:300]}",
    )
    checks.check(
        "the gpu worker's container was killed during fine-tuning (after >= 1 epoch, before the last)",
        lambda: killed.get("epochs_done", 0) >= 1 and killed["epochs_done"] < FINETUNE_EPOCHS,
        lambda: {k: v for k, v in killed.items() if k in ("epochs_seen", "epochs_done", "kill_s", "mlflow_run")},
    )
    stage_runs = sorted((r for r in stage_flow_runs(client)), key=lambda r: r.created)
    ids["stage_flow_runs"] = [f"{r.id} {r.state.name if r.state else '?'} {r.work_pool_name}" for r in stage_runs]
    checks.check(
        "finetune ran on the gpu pool: the killed stage run Crashed, the retried one Completed",
        lambda: (
            len(stage_runs) == 2
            and stage_runs[0].state.is_crashed()
            and stage_runs[1].state.is_completed()
            and all(r.work_pool_name == "gpu" and r.parameters["stage"] == "finetune" for r in stage_runs)
        ),
        lambda: ids["stage_flow_runs"],
    )
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    resumed = optional(
        lambda: [
            entry.message
            for offset in range(0, 2000, 200)
            for entry in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[stage_runs[-1].id])),
                limit=200,
                offset=offset,
                sort=LogSort.TIMESTAMP_ASC,
            )
            if "resumed at epoch" in entry.message
        ]
    )
    checks.check(
        "the retried stage resumed from the checkpoint on the worker's volume",
        lambda: bool(resumed),
        lambda: (resumed or ["no 'resumed at epoch' line in the stage run's logs"])[0][-160:],
    )
    if not completed:  # its own log says why; the checks below need the run's outputs
        lines = optional(lambda: flow_run_logs(client, run_.id)) or []
        (tmp / "first_run.log").write_text("\n".join(lines) + "\n")
        errors = [line for line in lines if " ERROR " in line or "Traceback" in line or "Error" in line]
        report["facts"]["first_run_errors"] = [line[-600:] for line in errors[-6:]]
        raise E2EFailure(
            f"the first training run ended {run_.state.name}: {(run_.state.message or '')[:400]}\n"
            + "\n".join(line[-400:] for line in errors[-4:])
            + f"\n(all its log lines: {tmp / 'first_run.log'})"
        )
    summary = json.loads(stack.exec("worker-cpu", "cat /workspace/reports/run_summary.json", check=True).stdout)
    stages = {s["stage"]: s for s in summary.get("stages", [])}
    checks.check(
        "the cpu worker got finetune back from DVC's run-cache (not trained there)",
        lambda: stages["finetune"].get("where") == "stage/gpu",
        lambda: stages["finetune"],
    )
    model_name = summary.get("registered_model")
    ids["model"] = model_name
    champion = optional(lambda: mlflow_client.get_model_version_by_alias(model_name, "champion"))
    ids["champion_version"] = champion.version if champion else None
    finetune_run = json.loads(stack.exec("worker-cpu", "cat /workspace/models/finetune/run.json", check=True).stdout)[
        "run_id"
    ]
    ids["finetune_mlflow_run"] = finetune_run
    checks.check(
        "the MLflow server (Postgres, basic auth) holds a champion fine-tuned by the resumed MLflow run",
        lambda: (
            champion is not None
            and champion.tags.get("finetune_run_id") == finetune_run
            and killed.get("mlflow_run") == finetune_run
        ),
        lambda: {"model": model_name, "version": champion.version if champion else None, "finetune_run": finetune_run},
    )
    serving = role_client(stack.read_volume_file("s3-keys-serving", "credentials", IMAGES["mlflow"]), s3_url)
    source = champion.source if champion else ""
    objects = (
        optional(
            lambda: [
                o["Key"] for o in serving.list_objects_v2(Bucket="mlflow", Prefix="artifacts/").get("Contents", [])
            ]
        )
        or []
    )
    ids["artifact_objects"] = len(objects)
    checks.check(
        "the champion's artifacts are in the object store (read with the read-only serving key)",
        lambda: (
            champion is not None
            and any(k.endswith("MLmodel") for k in objects)
            and any(champion.run_id in k or (getattr(champion, "model_id", None) or "~") in k for k in objects)
        ),
        lambda: {"objects": len(objects), "source": source},
    )
    checks.check(
        "the serving key cannot write the model bucket or read the data bucket",
        lambda: (
            refused(lambda: serving.put_object(Bucket="mlflow", Key="artifacts/evil", Body=b"x"))
            and refused(lambda: serving.list_objects_v2(Bucket="dvc"))
        ),
    )
    mlflow_key = role_client(stack.exec("mlflow", "cat /run/s3/credentials", check=True).stdout, s3_url)
    checks.check(
        "the MLflow server's key cannot read the data (DVC) bucket",
        lambda: refused(lambda: mlflow_key.list_objects_v2(Bucket="dvc")),
    )
    in_sync = stack.exec("worker-cpu", "cd /workspace && dvc status --cloud").stdout.strip()
    checks.check(
        "the DVC remote (object store) holds every output of the run",
        lambda: "in sync" in in_sync,
        lambda: in_sync[-200:],
    )
    artifact = summary_artifact(client, run_.id)
    checks.check(
        "the `training-summary` artifact exists", lambda: artifact is not None and "| finetune |" in artifact.data
    )


# --------------------------------------------------------------------------- report
def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        f"# `make e2e-docker`: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        f"Started {report['started_at']}; total {report['timings'].get('total_s')} s on this machine "
        "(2 shared CPU cores, Docker's vfs storage driver). Written by infra/scripts/docker_e2e.py.",
        "",
    ]
    if report.get("error"):
        lines += [f"**Error:** {report['error'][:1500]}", ""]
    lines += ["## Checks", "", "| check | result | detail |", "|---|---|---|"]
    for c in report["checks"]:
        detail = json.dumps(c["detail"]) if not isinstance(c["detail"], str) else c["detail"]
        lines.append(f"| {c['name']} | {'ok' if c['passed'] else 'FAIL'} | {detail[:200].replace('|', '/')} |")
    lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|"]
    for key, value in report["timings"].items():
        if isinstance(value, dict):
            for name, seconds in value.items():
                lines.append(f"| build {name} | {seconds} |")
        else:
            lines.append(f"| {key} | {value} |")
    if report.get("images"):
        lines += [
            "",
            "## Images",
            "",
            "| image | size (MB) | uid | python | pip/compiler found |",
            "|---|---|---|---|---|",
        ]
        for name, info in report["images"].items():
            lines.append(
                f"| {name} | {info['size_mb']} | {info.get('uid', '-')} | {info.get('python', '-')} | "
                f"{', '.join(info.get('tools_found', [])) or ('none' if 'uid' in info else '-')} |"
            )
    lines += ["", "## Facts", "", "```json", json.dumps(report["facts"], indent=2), "```", ""]
    path.write_text("\n".join(lines))
