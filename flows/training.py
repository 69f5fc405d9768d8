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
forms are confined by the workspace's `deployments:` settings first (components/run_forms.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, get_args

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from components import files, run_forms
from components.config import ParamsError, load_params
from components.contracts import RUN_INFO_FILE, ModelRunInfo, PromotionRecord
from components.credentials import redact
from components.drift import DriftReport
from components.errors import STATUS_DIR_VARIABLE
from components.orchestration_config import OrchestrationConfig
from components.overrides import (
    ParamsOverrides,
    add_set_argument,
    overrides_from_strings,
    overrides_to_strings,
    write_overrides,
)
from components.settings import environment
from flows import summary
from flows.limits import (
    StageFailed,
    StageTimedOut,
    failure,
    flow_deadline,
    retry_outages,
    run_streamed,
    workspace_slot,
)
from flows.notify import notify, notify_flow_failure

# The pipeline's stages in order (dvc.yaml); a Literal, so Prefect's run form offers exactly these.
Stage = Literal["ingest", "validate", "augment", "train_head", "finetune", "evaluate"]
STAGES: tuple[str, ...] = get_args(Stage)
LOCK_FILE = Path(".tp") / "training.lock"


def stage_outcome(status_dir: Path, stage: str) -> dict[str, Any]:
    """How the stage's own process ended (components.errors.record_outcome), {} if it left nothing."""
    path = status_dir / f"{stage}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for stage processes: this interpreter's tools first, flow run id for lineage."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run_id = flow_run.get_id()
    if run_id:
        env["TP_PREFECT_FLOW_RUN_ID"] = str(run_id)
    return {**env, **(extra or {})}


def run_dvc(
    args: list[str],
    workdir: Path,
    logger: Any | None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> tuple[int, list[str]]:
    """Run a DVC command, streaming its output to the logger (if any); return exit code and lines.

    Past `timeout_s` DVC and the stage process it started are killed (StageTimedOut)."""
    dvc = Path(sys.executable).parent / "dvc"
    cmd = [str(dvc) if dvc.exists() else "dvc", *args]
    return run_streamed(cmd, workdir, _stage_env(env), logger, timeout_s)


def run_component(cmd: list[str], workdir: str, timeout_s: float, env: dict[str, str] | None = None):
    """A component's CLI with a deadline: StageTimedOut (it is killed) past `timeout_s`."""
    try:
        return subprocess.run(cmd, cwd=workdir, env=_stage_env(env), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise StageTimedOut(f"`{' '.join(cmd[2:4])}` ran past its timeout of {timeout_s:g} s") from None


@task(name="preflight")
def preflight(workdir: str, params_path: str, timeout_s: float) -> None:
    """Check the settings against the backbone and augmentation library before any stage does work."""
    proc = run_component([sys.executable, "-m", "components.preflight", "--params", params_path], workdir, timeout_s)
    if proc.returncode != 0:
        output = proc.stderr or proc.stdout
        # Keep preflight's own message, not the libraries' start-up chatter before it.
        raise ParamsError(output[output.find("preflight: ") :].strip().removeprefix("preflight: "))
    get_run_logger().info(proc.stdout.strip())


@task(name="export-champion", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_outages)
def export_champion(workdir: str, run_id: str, timeout_s: float) -> dict[str, Any]:
    """SavedModel + float16 TFLite of the new champion, checked against Keras, logged to its MLflow run."""
    logger = get_run_logger()
    cmd = [
        sys.executable,
        "-m",
        "components.export",
        "--model-dir",
        "models/finetune",
        "--out-dir",
        "models/export",
        "--manifest",
        "data/validated.csv",
        "--split",
        "test",
        "--mlflow-run",
        run_id,
    ]
    with tempfile.TemporaryDirectory(prefix="tp-status-") as status_dir:
        proc = run_component(cmd, workdir, timeout_s, {STATUS_DIR_VARIABLE: status_dir})
        outcome = stage_outcome(Path(status_dir), "export")
    if proc.returncode != 0:
        raise failure("export of the champion", proc.returncode, proc.stderr.strip().splitlines(), outcome)
    logger.info(proc.stdout.strip().splitlines()[-1])
    return files.read_json(Path(workdir) / "models/export/export.json")


def default_remote(root: Path) -> str | None:
    """The workspace's default DVC remote, if one is configured (.dvc/config or config.local)."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "remote", "default"],
        cwd=root,
        env=_stage_env(),
        capture_output=True,
        text=True,
    )
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def push_data(root: Path, logger: Any, timeout_s: float | None = None) -> dict[str, Any]:
    """Send data and models to the default DVC remote, so other machines (and the registry's lineage) can fetch them."""
    remote = default_remote(root)
    if remote is None:
        logger.info("no default DVC remote configured: data and models stay in the local DVC cache")
        return {"remote": None, "pushed": False}
    code, lines = run_dvc(["push", "--run-cache"], root, logger, timeout_s=timeout_s)
    if code != 0:
        raise StageFailed(
            f"dvc push to remote '{remote}' failed (its URL is in `dvc remote list`); "
            "the run's outputs are complete locally and the next run pushes them:\n" + "\n".join(lines[-10:]),
            retryable=True,  # a remote that did not answer
        )
    return {"remote": remote, "pushed": True}


@task(name="push-data", retries=3, retry_delay_seconds=[10, 30, 90], retry_condition_fn=retry_outages)
def push_to_remote(workdir: str, timeout_s: float) -> dict[str, Any]:
    return push_data(Path(workdir), get_run_logger(), timeout_s)


def changed_stages(root: Path, stage: str | None = None) -> set[str]:
    """DVC's own answer: the stages (all, or `stage` alone) whose deps, params, code or outs changed."""
    code, lines = run_dvc(["status", "--json", *([stage] if stage else [])], root, logger=None)
    if code != 0:
        raise StageFailed(f"dvc status {stage or ''} failed:\n" + "\n".join(lines[-15:]))
    return {key.removeprefix("dvc.yaml:") for key in json.loads("".join(lines) or "{}")}


def stage_is_current(stage: str, root: Path, logger: Any) -> bool:
    """Is the stage unchanged since its last run (its deps, params, code and outs)?"""
    return stage not in changed_stages(root, stage)


def _stage_task(stage: str):
    # Timeout, retries and delays come from params.yaml at run time (`stage_task`).
    @task(name=f"stage:{stage}", retry_condition_fn=retry_outages)
    def run(workdir: str, timeout_s: float | None = None, known_current: bool = False) -> dict[str, Any]:
        """`known_current`: the flow's one `dvc status` of the whole pipeline already said so."""
        logger = get_run_logger()
        started = time.monotonic()
        root = Path(workdir)
        if known_current or stage_is_current(stage, root, logger):
            logger.info("stage %s is up to date (dvc status): skipped", stage)
            return {"stage": stage, "ran": False, "seconds": round(time.monotonic() - started, 1)}
        with tempfile.TemporaryDirectory(prefix="tp-status-") as status_dir:
            extra = {STATUS_DIR_VARIABLE: status_dir}
            code, lines = run_dvc(["repro", "--single-item", stage], root, logger, env=extra, timeout_s=timeout_s)
            outcome = stage_outcome(Path(status_dir), stage)
        if code != 0:
            raise failure(f"stage '{stage}'", code, lines, outcome)
        if not stage_is_current(stage, root, logger):
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


STAGE_MODEL_DIRS = {"train_head": Path("models/head"), "finetune": Path("models/finetune")}
# Stages that may be sent to a GPU work pool (TP_GPU_DEPLOYMENT names the deployment of stage_flow).
GPU_STAGES = ("finetune",)


def git_revision(root: Path) -> str:
    """HEAD of the workspace; a remote worker runs exactly this code, so it must be committed."""
    rev = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "components", "flows", "dvc.yaml"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if dirty:
        raise RuntimeError(
            "stage code has uncommitted changes; a GPU worker runs the committed revision, so commit first "
            f"(changed: {dirty.splitlines()[:5]})"
        )
    return rev


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
    if stage_is_current(stage, root, logger):
        return {"stage": stage, "ran": False, "seconds": round(time.monotonic() - started, 1), "where": "up to date"}
    upstream = STAGES[STAGES.index(stage) - 1]
    code, lines = run_dvc(["push", "--with-deps", "--run-cache", upstream], root, logger)
    if code != 0:
        raise StageFailed(
            "dvc push failed: sending the stage's inputs to the DVC remote:\n" + "\n".join(lines[-15:]), retryable=True
        )
    parameters = {
        "stage": stage,
        "git_rev": git_revision(root),
        "params_yaml": (root / "params.yaml").read_text(encoding="utf-8"),
        "dvc_lock": (root / "dvc.lock").read_text(encoding="utf-8") if (root / "dvc.lock").exists() else "",
    }
    logger.info("sending stage %s to deployment %s (revision %s)", stage, deployment, parameters["git_rev"][:12])
    remote = run_deployment(deployment, parameters=parameters, timeout=timeout_s)
    if remote.state is None or not remote.state.is_final():
        cancel_flow_run(remote.id)
        raise StageTimedOut(
            f"stage '{stage}' on deployment {deployment} did not finish within {timeout_s} s "
            f"(orchestration.remote_stage_timeout_s): flow run {remote.id} was cancelled"
        )
    if not remote.state.is_completed():
        raise StageFailed(
            f"stage '{stage}' on deployment {deployment} ended {remote.state.name} (flow run {remote.id})",
            retryable=remote.state.is_crashed(),  # its infrastructure failed, not the stage
        )
    # `repro --pull` fetches the run-cache entry and its outputs, then checks them out. (`dvc pull <stage>`
    # cannot: this dvc.lock has no hashes for the stage yet.) A miss makes DVC run the stage here instead.
    code, lines = run_dvc(["repro", "--pull", "--single-item", stage], root, logger)
    if code != 0:
        raise StageFailed(
            "dvc repro --pull failed: fetching the result of the remote stage:\n" + "\n".join(lines[-15:]),
            retryable=True,
        )
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


def cancel_flow_run(flow_run_id: Any) -> None:
    """Ask Prefect to cancel a flow run (its worker stops it), so a timed-out remote stage frees its GPU."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="the orchestrating run stopped waiting"), force=True)


# The CLI's flow and the deployments' entry point are one flow to Prefect: same name, same hooks.
TRAINING_FLOW: dict[str, Any] = {
    "name": "training",
    "log_prints": True,
    "validate_parameters": True,
    "on_failure": [notify_flow_failure],
    "on_crashed": [notify_flow_failure],
}


def made_by_flow_run(root: Path, stage: str) -> str | None:
    """The Prefect flow run recorded in a training stage's model folder (its declared output)."""
    folder = STAGE_MODEL_DIRS.get(stage)
    if folder is None or not (root / folder / RUN_INFO_FILE).is_file():
        return None
    return ModelRunInfo.read(root / folder / RUN_INFO_FILE).prefect_flow_run_id


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


def _run_pipeline(
    root: Path, params_file: Path, changes: list[str], experiment: str | None, logger: Any
) -> dict[str, Any]:
    """The stages (as a DVC experiment when there are `changes`), export, push; the run's summary."""
    if changes:
        return _run_experiment(root, params_file, changes, experiment or experiment_name(), logger)
    params = load_params(params_file)
    limits = params.orchestration
    step = limits.step_timeout_s
    step_task(preflight, limits)(str(root), str(params_file), step)
    parent = step_task(open_pipeline_run, limits)(params.tracking.model_dump(), str(root), None)
    os.environ["TP_MLFLOW_PARENT_RUN_ID"] = parent  # stage processes nest their MLflow runs under it
    gpu_deployment = environment().gpu_deployment
    progress = start_progress(f"stage 0 of {len(STAGES)}")
    # One `dvc status` for the pipeline (a nightly run with nothing new costs one DVC start, not six):
    # it holds for each stage until a stage before it reproduces and so changes what it depends on.
    try:
        changed_at_start = changed_stages(root)
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
                outcomes.append(
                    stage_task(stage, limits)(str(root), getattr(limits.stage_timeout_s, stage), known_current)
                )
            report_progress(progress, done, stage)
            if stage == "validate" and outcomes[-1]["ran"]:  # new data: does it still look like the model's?
                drift = step_task(check_drift, limits)(str(root), str(params_file), step)
    except BaseException:
        step_task(close_pipeline_run, limits)(params.tracking.model_dump(), str(root), parent, "FAILED", {})
        raise
    finally:
        os.environ.pop("TP_MLFLOW_PARENT_RUN_ID", None)
    step_task(close_pipeline_run, limits)(
        params.tracking.model_dump(),
        str(root),
        parent,
        "FINISHED",
        {"stages_run": ",".join(o["stage"] for o in outcomes if o["ran"]) or "none"},
        [str(DRIFT_REPORT)] if drift is not None else [],
    )
    promotion = PromotionRecord.read_optional(root / summary.REPORTS["promotion"][0])
    promoted_now = promoted_by_this_run(promotion)
    exported = step_task(export_champion, limits)(str(root), promotion.run_id, step) if promoted_now else None
    pushed = step_task(push_to_remote, limits)(str(root), step)
    return {
        **summary.collect(root, params, outcomes),
        "mlflow_run_id": parent,
        "export": exported,
        "dvc_remote": pushed,
        "experiment": None,
        "promoted_now": promoted_now,
        "drift": drift,
    }


def promoted_by_this_run(promotion: PromotionRecord | None) -> bool:
    """A promotion is this run's only if this flow run registered it: a run-cache restore of evaluate
    brings back an old promotion.json, which must not be exported or announced again."""
    this_run = str(flow_run.get_id() or "")
    return bool(
        promotion and promotion.promoted and this_run and promotion.lineage.get("prefect_flow_run_id") == this_run
    )


def _run_experiment(root: Path, params_file: Path, changes: list[str], name: str, logger: Any) -> dict[str, Any]:
    """`changes` as a DVC experiment in a temporary copy of the workspace (`dvc exp run --temp`).

    The workspace's params.yaml, dvc.lock and outputs are never written, so no crash can leave an
    experiment's settings behind. The experiment's results are read back from DVC (`dvc exp show`).
    """
    params = load_params(params_file, changes)
    limits = params.orchestration
    step = limits.step_timeout_s
    logger.info("experiment %s: %s (run in a temporary copy; params.yaml is not written)", name, ", ".join(changes))
    if environment().gpu_deployment:
        logger.info("experiments run here, in DVC's temporary copy: no stage goes to %s", environment().gpu_deployment)
    with tempfile.TemporaryDirectory(prefix="tp-experiment-") as scratch:
        # Preflight reads a settings file: a scratch copy with the changes, outside the workspace.
        merged = Path(scratch) / "params.yaml"
        merged.write_bytes(params_file.read_bytes())
        write_overrides(merged, changes)
        step_task(preflight, limits)(str(root), str(merged), step)
    parent = step_task(open_pipeline_run, limits)(params.tracking.model_dump(), str(root), name)
    os.environ["TP_MLFLOW_PARENT_RUN_ID"] = parent  # the experiment's stage processes nest under it
    # One task runs every stage in DVC's copy: its timeout is theirs together.
    pipeline_s = sum(limits.stage_timeout_s.model_dump().values())
    progress = start_progress(f"DVC experiment {name} running")
    try:
        outcomes = run_experiment.with_options(timeout_seconds=pipeline_s)(str(root), name, changes, pipeline_s)
    except BaseException:
        step_task(close_pipeline_run, limits)(params.tracking.model_dump(), str(root), parent, "FAILED", {})
        raise
    finally:
        os.environ.pop("TP_MLFLOW_PARENT_RUN_ID", None)
    update_progress_artifact(progress, 100.0, f"DVC experiment {name} done")
    step_task(close_pipeline_run, limits)(
        params.tracking.model_dump(),
        str(root),
        parent,
        "FINISHED",
        {"stages_run": ",".join(o["stage"] for o in outcomes if o["ran"]) or "none"},
    )
    result = summary.collect_experiment(root, params, outcomes, name)
    promotion = PromotionRecord.model_validate(result["promotion"]) if result.get("promotion") else None
    promoted_now = promoted_by_this_run(promotion)
    if promoted_now:
        logger.warning(
            "experiment %s promoted its model; its folder is in the experiment, so it is not exported here: "
            "`dvc exp apply %s`, then `python -m components.export`",
            name,
            name,
        )
    pushed = step_task(push_to_remote, limits)(str(root), step)
    return {
        **result,
        "mlflow_run_id": parent,
        "export": None,
        "dvc_remote": pushed,
        "experiment": name,
        "promoted_now": promoted_now,
        "drift": None,
    }


def experiment_outcomes(lines: list[str]) -> list[dict[str, Any]]:
    """Per stage, whether `dvc exp run` reproduced it (ran, or restored from the run-cache) or skipped it."""
    text = "\n".join(lines)
    return [
        {
            "stage": stage,
            "ran": f"Running stage '{stage}'" in text or f"Stage '{stage}' is cached" in text,
            "seconds": 0.0,
            "where": "experiment (temporary copy)",
        }
        for stage in STAGES
    ]


def copied_into_experiments(root: Path) -> list[str]:
    """What DVC's temporary copy needs from the workspace to skip unchanged stages: dvc.lock (also when
    uncommitted) and the `cache: false` outputs, which DVC cannot check out from its cache.

    DVC copies a file only into a folder that exists there, so an uncached file goes with its folder
    (cached outputs copied along are checked out again by DVC anyway).
    """
    # DVC internals on purpose: no public API (dvc.api, the CLI's --json outputs) lists a stage's outputs
    # with their `cache` flag; dvc.yaml alone would miss the `metrics:` and `plots:` outputs DVC adds.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        uncached = {Path(out.fs_path) for stage in repo.index.stages for out in stage.outs if not out.use_cache}
    folders = {p if p.is_dir() or p.parent == root else p.parent for p in uncached if p.exists()}
    outermost = sorted(f for f in folders if not any(other in f.parents for other in folders))
    return [str(p.relative_to(root)) for p in [root / "dvc.lock", *outermost] if p.exists()]


@task(name="dvc-experiment")
def run_experiment(workdir: str, name: str, changes: list[str], timeout_s: float | None = None) -> list[dict[str, Any]]:
    """`dvc exp run --temp -n NAME -S ...`: the whole pipeline in DVC's temporary copy, saved as an experiment."""
    root = Path(workdir)
    args = ["exp", "run", "--temp", "--name", name]
    for path in copied_into_experiments(root):
        args += ["--copy-paths", path]
    for change in changes:
        args += ["--set-param", change]
    code, lines = run_dvc(args, root, get_run_logger(), timeout_s=timeout_s)
    if code != 0:
        raise StageFailed(f"experiment {name} failed:\n" + "\n".join(lines[-25:]), retryable=False)
    return experiment_outcomes(lines)


DRIFT_REPORT = Path("reports/drift.json")
LAST_MODEL = Path("models/finetune")  # the workspace's last trained model; its drift reference is the baseline


@task(name="drift-check")
def check_drift(workdir: str, params_path: str, timeout_s: float | None = None) -> dict[str, Any] | None:
    """Compare the newly validated images with the last trained model's data (components.drift_check);
    None when there is no earlier model with a reference. The policy (drift.policy) decides retraining."""
    logger = get_run_logger()
    root = Path(workdir)
    if not (root / LAST_MODEL / "drift_reference.npz").is_file():
        logger.info("drift: no earlier model with a reference: nothing to compare with")
        return None
    cmd = [
        sys.executable,
        "-m",
        "components.drift_check",
        "--params",
        params_path,
        "--model-dir",
        str(LAST_MODEL),
        "--manifest",
        "data/validated.csv",
        "--out",
        str(DRIFT_REPORT),
    ]
    proc = run_component(cmd, str(root), timeout_s)
    if proc.returncode != 0:
        raise StageFailed(f"drift check failed:\n{proc.stderr.strip()[-2000:]}", retryable=False)
    logger.info(proc.stdout.strip().splitlines()[-1])
    report = DriftReport.read(root / DRIFT_REPORT)
    if report.drifted and not report.retrain:
        notify("drift", f"new data drifted from the model's training data: {report.reason}")
    return report.model_dump(mode="json")


# MLflow calls are retried by the tracking retry policy (tracking.retry_attempts), not a second time by Prefect.
@task(name="mlflow-pipeline-run")
def open_pipeline_run(tracking: dict[str, Any], workdir: str, experiment: str | None) -> str:
    """One MLflow parent run per flow run: the stage runs nest under it (one row per pipeline run)."""
    from components.config import TrackingConfig
    from components.pipeline_runs import start_pipeline_run

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

    from components.config import TrackingConfig
    from components.tracking_connection import RetryPolicy, setup_mlflow, with_retries

    config = TrackingConfig(**tracking)
    policy = RetryPolicy.from_config(config)
    with_retries("reach the tracking server", setup_mlflow, config, workdir, policy=policy)
    client = MlflowClient()
    for key, value in tags.items():
        with_retries("tag the pipeline run", client.set_tag, run_id, key, value, policy=policy)
    for artifact in artifacts or []:
        with_retries("log an artifact", client.log_artifact, run_id, str(Path(workdir) / artifact), policy=policy)
    with_retries("end the pipeline run", client.set_terminated, run_id, status, policy=policy)


def experiment_name() -> str:
    """A readable, unique experiment name: the Prefect flow run's own name when there is one."""
    return f"flow-{flow_run.get_name() or time.strftime('%Y%m%d-%H%M%S')}"


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
    override (components/run_forms.py); `workdir` is the worker's workspace, `.` only. Its timeouts are
    the worker's own (`orchestration:` of its params.yaml, which no form may change).
    """
    # A deployment's run form: untrusted. Checked against this worker's own params.yaml before anything runs.
    rules = run_forms.check_stage_form(stage, STAGES, git_rev, dvc_lock, workdir)
    root = Path.cwd().resolve()
    limits = load_params(root / "params.yaml").orchestration  # the worker's trusted settings, read before any write
    with flow_deadline(limits.flow_timeout_s, f"stage run {stage}"):
        _run_stage_here(stage, git_rev, params_yaml, dvc_lock, root, rules, limits)
    return {"stage": stage, "git_rev": git_rev}


def _run_stage_here(
    stage: str,
    git_rev: str | None,
    params_yaml: str | None,
    dvc_lock: str | None,
    root: Path,
    rules: Any,
    limits: OrchestrationConfig,
) -> None:
    """stage_flow's work once its form passed: check out, pull, reproduce, push (each DVC command bounded)."""
    baseline = (root / "params.yaml").read_text(encoding="utf-8")
    if git_rev:
        subprocess.run(["git", "fetch", "--quiet", "origin"], cwd=root, capture_output=True, text=True)
        run_forms.check_git_rev(root, git_rev, rules)
        shown = subprocess.run(["git", "show", f"{git_rev}:params.yaml"], cwd=root, capture_output=True, text=True)
        baseline = shown.stdout if shown.returncode == 0 else baseline
    if params_yaml is not None:
        run_forms.check_received_params(params_yaml, baseline, root, rules)
    logger = get_run_logger()
    if git_rev:
        done = subprocess.run(
            ["git", "checkout", "--quiet", "--force", git_rev], cwd=root, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise StageFailed(f"git checkout {git_rev} failed on the worker: {done.stderr.strip()}")
    if params_yaml is not None:
        (root / "params.yaml").write_text(params_yaml, encoding="utf-8")
    if dvc_lock:
        (root / "dvc.lock").write_text(dvc_lock, encoding="utf-8")
    load_params(root / "params.yaml")  # fail fast here too
    upstream = STAGES[: STAGES.index(stage)]
    step, repro = limits.step_timeout_s, getattr(limits.stage_timeout_s, stage)
    for args, timeout_s in ([(["pull", "--with-deps", upstream[-1]], step)] if upstream else []) + [
        (["repro", "--single-item", stage], repro),
        (["push", "--run-cache", stage], step),
    ]:
        code, lines = run_dvc(args, root, logger, timeout_s=timeout_s)
        if code != 0:
            raise StageFailed(f"dvc {' '.join(args)} failed on the worker:\n" + "\n".join(lines[-25:]))
    push_uncached_outputs(root, stage)


def push_uncached_outputs(root: Path, stage: str) -> int:
    """Push the stage's `cache: false` outputs (plots, metrics) to the DVC remote; return how many.

    DVC's run-cache restores a stage only when all its outputs are in the cache, and it saves the
    uncached ones there too, but `dvc push --run-cache` never sends those: without this the
    orchestrator's `repro --pull` misses and trains the stage a second time.
    """
    # DVC internals on purpose: dvc.api has no push (only reads: open, read, DVCFileSystem, exp_show, ...),
    # and the `dvc push` command skips `cache: false` outputs whatever its targets. Pinned by the lock file;
    # tests/integration/test_remote_stage.py fails if these calls change.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.stage.collect(f"{root / 'dvc.yaml'}:{stage}")  # an address: targets resolve against the cwd
        objects = {out.hash_info for one in found for out in one.outs if not out.use_cache and out.hash_info}
        result = repo.cloud.push(objects)
    if result.failed:
        raise StageFailed(
            f"could not push the uncached outputs of stage '{stage}': {sorted(h.value for h in result.failed)}"
        )
    return len(objects)


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
