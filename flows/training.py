"""The training flow: the six stages of dvc.yaml as Prefect tasks, in one workspace.

Each task runs `dvc repro --single-item <stage>`, so the flow and a plain `dvc repro` share one
cache and one dvc.lock: a stage whose inputs did not change is skipped by either runner. The flow
adds what DVC lacks: fail-fast settings checks, one run per workspace, retries for the stages that
can fail transiently, timeouts (flows/limits.py), Prefect logs, and summary, per-class metrics, link and
progress artifacts.

    python -m flows.training                              # the pipeline on params.yaml
    python -m flows.training --source DIR                 # train on DIR from now on (ingest.source)
    python -m flows.training --set finetune.epochs=3      # a DVC experiment: params.yaml stays as it is

`--set` runs `dvc exp run --temp -S ...`: DVC runs the pipeline in a temporary copy of the workspace,
so a run killed at any point (SIGKILL, OOM) leaves the workspace's params.yaml, dvc.lock and outputs
as they were. The CLI is trusted; deployments run `training_deployment` and `stage_flow`, whose run
forms are confined by the workspace's `deployments:` settings first (components/lifecycle/run_forms.py).

This module wires the run (order, drift gate, experiments, artifacts); the tasks are in
flows/stage_tasks.py, the DVC and git commands in flows/dvc_workspace.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.core.config import ParamsError, load_params
from components.core.contracts import PromotionRecord
from components.core.credentials import redact
from components.core.orchestration_config import OrchestrationConfig
from components.core.overrides import (
    ParamsOverrides,
    add_set_argument,
    overrides_from_strings,
    overrides_to_strings,
    write_overrides,
)
from components.core.paths import DRIFT_REPORT, PROMOTION_RECORD
from components.core.settings import environment
from components.lifecycle import run_forms
from flows import summary
from flows.dvc_workspace import LOCK_FILE, STAGES, Stage, changed_stages, needs_preflight
from flows.embedding_shards import embed_before_validate
from flows.experiments import experiment_name, run_as_experiment
from flows.limits import flow_deadline, workspace_slot
from flows.notify import notify, notify_flow_failure
from flows.remote_stage import GPU_STAGES, run_stage_here, run_stage_remotely
from flows.run_records import (
    finish_pipeline_run,
    pipeline_run,
    promoted_by_this_run,
    publish_artifacts,
    report_progress,
    start_progress,
)
from flows.stage_tasks import check_drift, export_champion, preflight, push_to_remote, stage_task, step_task

# The CLI's flow and the deployments' entry point are one flow to Prefect: same name, same hooks.
TRAINING_FLOW: dict[str, Any] = {
    "name": "training",
    "log_prints": True,
    "validate_parameters": True,
    "on_failure": [notify_flow_failure],
    "on_crashed": [notify_flow_failure],
}


@flow(**TRAINING_FLOW)
def training_flow(
    params_path: str = "params.yaml",
    overrides: ParamsOverrides | None = None,  # type: ignore[valid-type]
    source: str | None = None,
    experiment: str | None = None,
    workdir: str = ".",
) -> dict[str, Any]:
    """Ingest -> validate -> augment -> train_head -> finetune -> evaluate, skipping unchanged stages.

    `source` changes the data the workspace trains on (written to params.yaml, like editing it).
    `overrides` make this run a DVC experiment: the stages run with them, the result is saved as
    an experiment (`dvc exp show`, `dvc exp apply NAME`), and params.yaml is left as it was.
    """
    logger = get_run_logger()
    root = Path(workdir).resolve()
    params_file = root / params_path
    changes = overrides_to_strings(overrides)
    settings = load_params(params_file, ([f"ingest.source={json.dumps(source)}"] if source else []) + changes)
    limits = settings.orchestration
    # Waiting for another run is bounded by workspace_wait_s; the run itself, once it holds the workspace,
    # by flow_timeout_s.
    with workspace_slot(root, LOCK_FILE, limits, logger), flow_deadline(limits.flow_timeout_s, "the training run"):
        if source:
            write_overrides(params_file, [f"ingest.source={json.dumps(source)}"])
            logger.info("params.yaml: ingest.source set to %s", redact(source))
        result = _run_pipeline(root, params_file, changes, experiment if changes else None, logger)
    markdown = summary.write(root, result)
    create_markdown_artifact(
        key="training-summary",
        markdown=markdown,
        description="Data, validation, metrics and registry decision of this run",
    )
    publish_artifacts(root, settings.tracking.model_dump(), result, logger)
    promotion = result.get("promotion")
    if result["promoted_now"]:
        notify(
            "promoted",
            f"{result['registered_model']} version {promotion['version']} is the new champion",
            reason="; ".join(promotion["reasons"]),
        )
    return result


@flow(**TRAINING_FLOW)
def training_deployment(
    params_path: str = "params.yaml",
    overrides: ParamsOverrides | None = None,  # type: ignore[valid-type]
    source: str | None = None,
    experiment: str | None = None,
    workdir: str = ".",
) -> dict[str, Any]:
    """The training flow for deployments (prefect.yaml): the run form is checked first.

    Its parameters are untrusted: the workspace's `deployments:` settings decide which overrides
    (never a limit), which source (under `input_roots`) and which workspace (only the worker's own)
    a run may ask for; anything else is refused before anything runs.
    """
    run_forms.check_training_form(params_path, workdir, overrides_to_strings(overrides), source, experiment)
    return training_flow.fn(params_path, overrides, source, experiment, workdir)


@flow(name="stage", log_prints=True)
def stage_flow(
    stage: Stage,
    git_rev: str | None = None,
    params_yaml: str | None = None,
    dvc_lock: str | None = None,
    workdir: str = ".",
) -> dict[str, Any]:
    """Run one stage in this worker's clone of the project (the GPU work pool's entry point).

    Checks out `git_rev`, takes the orchestrator's params.yaml and dvc.lock, pulls the stage's inputs
    from the DVC remote, runs the stage, and pushes its outputs with DVC's run-cache entry. Its
    parameters come from a run form (untrusted): `git_rev` must be a commit on a `deployments.git_refs`
    branch, and `params_yaml` may differ from that commit's params.yaml only in keys a form may
    override (components/lifecycle/run_forms.py); `workdir` is the worker's workspace, `.` only. Its timeouts are
    the worker's own (`orchestration:` of its params.yaml, which no form may change).
    """
    # A deployment's run form: untrusted. Checked against this worker's own params.yaml before anything runs.
    rules = run_forms.check_stage_form(stage, STAGES, git_rev, dvc_lock, workdir)
    root = Path.cwd().resolve()
    limits = load_params(root / "params.yaml").orchestration  # the worker's trusted settings, read before any write
    with flow_deadline(limits.flow_timeout_s, f"stage run {stage}"):
        run_stage_here(stage, git_rev, params_yaml, dvc_lock, root, rules, limits)
    return {"stage": stage, "git_rev": git_rev}


def _run_pipeline(
    root: Path, params_file: Path, changes: list[str], experiment: str | None, logger: Any
) -> dict[str, Any]:
    """The stages (as a DVC experiment when there are `changes`), export, push; the run's summary."""
    if changes:
        return run_as_experiment(root, params_file, changes, experiment or experiment_name(), logger)
    params = load_params(params_file)
    limits = params.orchestration
    step = limits.step_timeout_s
    # One `dvc status` for the pipeline (a nightly run with nothing new costs one DVC start, not six):
    # it holds for each stage until a stage before it reproduces and so changes what it depends on.
    changed_at_start = changed_stages(root)
    if needs_preflight(changed_at_start):
        step_task(preflight, limits)(str(root), str(params_file), step)
    with pipeline_run(params, root, None) as parent:
        outcomes, drift = _run_stages(root, params_file, limits, changed_at_start)
    finish_pipeline_run(params, root, parent, outcomes, [str(DRIFT_REPORT)] if drift is not None else [])
    promotion = PromotionRecord.read_optional(root / PROMOTION_RECORD)
    promoted_now = promoted_by_this_run(promotion)
    exported = step_task(export_champion, limits)(str(root), promotion.run_id, step) if promoted_now else None
    pushed = step_task(push_to_remote, limits)(str(root), step)
    reports = summary.collect(root, params, outcomes)
    return summary.run_result(reports, parent, pushed, promoted_now, export=exported, drift=drift)


def _run_stages(
    root: Path, params_file: Path, limits: OrchestrationConfig, changed_at_start: set[str]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Each stage in order (here, or on the GPU pool), held back when the drift policy says so."""
    step = limits.step_timeout_s
    gpu_deployment = environment().gpu_deployment
    progress = start_progress(f"stage 0 of {len(STAGES)}")
    outcomes, drift = [], None
    for done, stage in enumerate(STAGES, start=1):
        if drift is not None and not drift["retrain"] and drift["new_images"]:
            outcomes.append({"stage": stage, "ran": False, "seconds": 0.0, "where": "held by drift policy"})
        elif gpu_deployment and stage in GPU_STAGES:
            remote = limits.remote_stage_timeout_s
            outcomes.append(
                run_stage_remotely.with_options(
                    timeout_seconds=remote + step, retry_jitter_factor=limits.retry_jitter_factor
                )(stage, str(root), gpu_deployment, remote)
            )
        else:
            known_current = stage not in changed_at_start and not any(o["ran"] for o in outcomes)
            if stage == "validate" and not known_current:  # its embedding pass sharded over tasks, if asked
                embed_before_validate(root, params_file, get_run_logger())
            outcomes.append(stage_task(stage, limits)(str(root), getattr(limits.stage_timeout_s, stage), known_current))
        report_progress(progress, done, stage)
        if stage == "validate" and outcomes[-1]["ran"]:  # new data: does it still look like the model's?
            drift = step_task(check_drift, limits)(str(root), str(params_file), step)
    return outcomes, drift


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tp-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="settings file, relative to --workdir")
    parser.add_argument("--source", help="train on this data from now on (sets ingest.source in the params file)")
    add_set_argument(parser, "run as a DVC experiment with this setting changed (params file left as it is)")
    parser.add_argument("--name", help="the experiment's name (with --set)")
    parser.add_argument("--workdir", default=".", help="the DVC workspace (a git repository)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = overrides_from_strings(args.overrides) if args.overrides else None
        result = training_flow(
            params_path=args.params, overrides=overrides, source=args.source, experiment=args.name, workdir=args.workdir
        )
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
