"""Running the pipeline beyond one process: work pools and served deployments.

`prefect.yaml` is the single description of the deployments. Two ways to run them:

- With workers (production): create the pools once, then `prefect --no-prompt deploy --all`
  and start a worker per pool (infra/README.md):
      python -m flows.deployments --create-pools [--gpu-pool-type docker]
- Without any infrastructure, on one machine: serve the same deployments from this process
  (schedules included; runs execute here, in the current directory):
      python -m flows.deployments --serve

`--notify-test` sends a test message through flows/notify.py's channel.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"
WORK_POOL_TEMPLATES = REPO / "infra" / "work-pools"
GPU_POOL_TEMPLATES = {
    "docker": WORK_POOL_TEMPLATES / "docker-gpu.json",
    "kubernetes": WORK_POOL_TEMPLATES / "kubernetes-gpu.json",
}
TRAINING_QUEUE = "training"  # shared by training/nightly and training/on-demand: one run at a time

logger = logging.getLogger("transfer_pipeline.deployments")


# --------------------------------------------------------------------------- prefect.yaml
def load_deployment_specs(prefect_yaml: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml, YAML anchors resolved."""
    document = yaml.safe_load(Path(prefect_yaml).read_text()) or {}
    return list(document.get("deployments") or [])


def deployment_label(spec: dict[str, Any]) -> str:
    """`flow/deployment`, the name Prefect shows and `run_deployment` takes."""
    return f"{spec['flow_name']}/{spec['name']}"


def to_deployment_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """Translate one prefect.yaml entry into `Flow.to_deployment` arguments (for `serve`)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron, Interval

    schedules = []
    for raw in spec.get("schedules") or []:
        common = {
            "timezone": raw.get("timezone"),
            "active": raw.get("active", True),
            "parameters": raw.get("parameters") or {},
        }
        if "cron" in raw:
            schedules.append(Cron(raw["cron"], **common))
        elif "interval" in raw:
            schedules.append(Interval(raw["interval"], **common))
        else:
            raise ValueError(f"{deployment_label(spec)}: only cron and interval schedules are served")

    kwargs: dict[str, Any] = {
        "name": spec["name"],
        "description": spec.get("description"),
        "tags": list(spec.get("tags") or []),
        "parameters": dict(spec.get("parameters") or {}),
        "schedules": schedules or None,
    }
    limit = spec.get("concurrency_limit")
    if isinstance(limit, dict):
        kwargs["concurrency_limit"] = ConcurrencyLimitConfig(
            limit=limit["limit"],
            collision_strategy=ConcurrencyLimitStrategy(limit.get("collision_strategy", "ENQUEUE")),
        )
    elif limit is not None:
        kwargs["concurrency_limit"] = int(limit)
    return kwargs


def build_runner_deployments(prefect_yaml: Path = PREFECT_YAML, only: list[str] | None = None) -> list[Any]:
    """The deployments of prefect.yaml as `RunnerDeployment`s for `serve` (only the `only` labels, if given)."""
    from prefect.flows import load_flow_from_entrypoint

    specs = [s for s in load_deployment_specs(prefect_yaml) if not only or deployment_label(s) in only]
    if not specs:
        raise SystemExit(f"no deployment in {prefect_yaml} matches {only}")
    # Entrypoints are relative to the directory of prefect.yaml, as for `prefect deploy`.
    return [
        load_flow_from_entrypoint(str(Path(prefect_yaml).parent / spec["entrypoint"])).to_deployment(
            **to_deployment_kwargs(spec)
        )
        for spec in specs
    ]


def serve_deployments(prefect_yaml: Path = PREFECT_YAML, only: list[str] | None = None) -> None:
    """Serve the deployments of prefect.yaml from this process (blocks until interrupted)."""
    from prefect import serve

    serve(*build_runner_deployments(prefect_yaml, only))


# --------------------------------------------------------------------------- work pools
@dataclass(frozen=True)
class PoolPlan:
    """A work pool to create: its name, worker type, base job template and concurrency."""

    name: str
    type: str
    base_job_template: dict[str, Any]
    concurrency_limit: int | None


def default_process_template() -> dict[str, Any]:
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def plan_work_pools(
    gpu_pool_type: str = "process", gpu_slots: int = 1, gpu_template: Path | None = None
) -> list[PoolPlan]:
    """`cpu` (process) and `gpu` (process here; docker or kubernetes with our GPU templates)."""
    if gpu_pool_type == "process":
        gpu_job_template = default_process_template()
    else:
        template_path = gpu_template or GPU_POOL_TEMPLATES.get(gpu_pool_type)
        if template_path is None:
            raise ValueError(f"no GPU base job template for pool type {gpu_pool_type!r}: pass one")
        gpu_job_template = json.loads(Path(template_path).read_text())
    return [
        PoolPlan("cpu", "process", default_process_template(), None),
        # The pool's limit is the number of GPUs: extra runs wait instead of sharing a GPU.
        PoolPlan("gpu", gpu_pool_type, gpu_job_template, gpu_slots),
    ]


def create_work_pools(
    gpu_pool_type: str = "process", gpu_slots: int = 1, gpu_template: Path | None = None
) -> list[str]:
    """Create or update the pools and the `training` queue (limit 1) on PREFECT_API_URL."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for plan in plan_work_pools(gpu_pool_type, gpu_slots, gpu_template):
            client.create_work_pool(
                WorkPoolCreate(
                    name=plan.name,
                    type=plan.type,
                    base_job_template=plan.base_job_template,
                    concurrency_limit=plan.concurrency_limit,
                ),
                overwrite=True,
            )
            created.append(plan.name)
        try:
            queue = client.read_work_queue_by_name(TRAINING_QUEUE, work_pool_name="cpu")
            client.update_work_queue(queue.id, concurrency_limit=1)
        except ObjectNotFound:
            client.create_work_queue(
                TRAINING_QUEUE,
                work_pool_name="cpu",
                concurrency_limit=1,
                description="Training runs: one at a time per workspace.",
            )
    return created


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tp-deploy", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--serve",
        action="store_true",
        help="serve the prefect.yaml deployments from this process (no workers, no pools)",
    )
    action.add_argument(
        "--create-pools",
        action="store_true",
        help="create/update the work pools `cpu` and `gpu` and the `training` queue",
    )
    action.add_argument("--list", action="store_true", help="print the deployments of prefect.yaml")
    action.add_argument(
        "--notify-test",
        action="store_true",
        help="send a test notification through TP_NOTIFY_BLOCK / TP_NOTIFY_WEBHOOK_URL",
    )
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_YAML, help="the deployments file")
    parser.add_argument(
        "--only", action="append", metavar="FLOW/DEPLOYMENT", help="with --serve: serve only these (repeatable)"
    )
    parser.add_argument(
        "--gpu-pool-type",
        choices=["process", "docker", "kubernetes"],
        default="process",
        help="with --create-pools: the gpu pool's worker type",
    )
    parser.add_argument("--gpu-template", type=Path, help="base job template JSON for the gpu pool")
    parser.add_argument("--gpu-slots", type=int, default=1, help="concurrent runs on the gpu pool (= GPUs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.list:
        for spec in load_deployment_specs(args.prefect_file):
            pool = (spec.get("work_pool") or {}).get("name")
            crons = [s.get("cron") or s.get("interval") for s in spec.get("schedules") or []]
            print(f"{deployment_label(spec):32} pool={pool:5} schedule={crons or '-'}  {spec['entrypoint']}")
        return 0
    if args.notify_test:
        from flows.notify import notify

        delivered = notify("test", "notification channel works")
        print("delivered" if delivered else "not delivered (nothing configured, or see the warning above)")
        return 0 if delivered else 1
    if args.create_pools:
        pools = create_work_pools(args.gpu_pool_type, args.gpu_slots, args.gpu_template)
        print(f"work pools ready: {', '.join(pools)}; queue cpu/{TRAINING_QUEUE} limited to 1 run")
        return 0
    serve_deployments(args.prefect_file, args.only)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
