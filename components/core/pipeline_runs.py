"""The MLflow runs around a stage's own: where a run came from (git and workspace tags), the pipeline's
parent run, and the runs of killed stages left RUNNING.

Parent and pipeline runs, made in the flow's long-lived process, are made with the client and passed
by id (never MLflow's process-global active run).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from components.core.config import TrackingConfig
from components.core.credentials import scrub_credentials
from components.core.settings import environment
from components.core.tracking_connection import RetryPolicy, setup_mlflow, with_retries

WORKSPACE_TAG = "tp.workspace"
GIT_COMMIT_TAG, GIT_BRANCH_TAG, GIT_REPO_URL_TAG = (
    "mlflow.source.git.commit",
    "mlflow.source.git.branch",
    "mlflow.source.git.repoURL",
)


def git_tags(workspace: str | Path | None = None) -> dict[str, str]:
    """MLflow's source tags for the code checked out in `workspace` (default: the current folder).

    MLflow resolves its own from the main script's folder, once per process; a stage command runs the
    workspace's own code (`python -m components.<stage>` in it), so the workspace's HEAD is the commit
    that ran, whichever script started the process. The remote URL loses any credentials. {} outside git.
    """
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=workspace or ".", capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "--verify", "-q", "HEAD")
        if not commit:
            return {}
        branch = git("symbolic-ref", "-q", "--short", "HEAD")  # empty on a detached HEAD
        remote = git("config", "--get", "remote.origin.url")
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {GIT_COMMIT_TAG: commit, GIT_BRANCH_TAG: branch, GIT_REPO_URL_TAG: scrub_credentials(remote)}
    return {key: value for key, value in found.items() if value}


def workspace_tag(workspace: str | Path | None = None) -> dict[str, str]:
    """Tag naming the machine and folder a run was started from (to find this workspace's orphans)."""
    import socket

    return {WORKSPACE_TAG: f"{socket.gethostname()}:{Path(workspace or '.').resolve()}"}


PIPELINE_TAG = "tp.pipeline_run"  # on parent runs: the flow run id or the DVC experiment's name


def pipeline_parent(client: Any, experiment_id: str) -> str | None:
    """The MLflow parent run of this pipeline run, so the UI shows one row per pipeline run.

    The flow makes one per flow run (TP_MLFLOW_PARENT_RUN_ID); a `dvc exp run` gets one per experiment
    name, found or made here; a plain `dvc repro` has none and its stage runs stand alone.
    """
    env = environment()
    if env.mlflow_parent_run_id:
        return env.mlflow_parent_run_id
    if not env.dvc_exp_name:
        return None
    name = env.dvc_exp_name.replace("'", "")
    found = client.search_runs([experiment_id], f"tags.`{PIPELINE_TAG}` = '{name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"experiment {name}",
        tags={PIPELINE_TAG: name, "dvc_experiment": name, **workspace_tag(), **git_tags()},
    )
    client.set_terminated(run.info.run_id, "FINISHED")  # a container: its stage runs carry the status
    return run.info.run_id


def start_pipeline_run(
    tracking: TrackingConfig, name: str, tags: dict[str, str], workspace: str | Path | None = None
) -> tuple[Any, str]:
    """(client, run_id) of a new parent run for one flow run; the caller ends it."""
    from mlflow import MlflowClient

    policy = RetryPolicy.from_config(tracking)
    experiment_id = with_retries("reach the tracking server", setup_mlflow, tracking, workspace, policy=policy)
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={PIPELINE_TAG: name, **workspace_tag(workspace), **git_tags(workspace), **tags},
    )
    return client, run.info.run_id


def end_orphaned_runs(
    client: Any, experiment_id: str, keep: str | None = None, workspace: str | Path | None = None
) -> list[str]:
    """End as KILLED the runs this workspace left RUNNING (a killed or cancelled stage), with a note.

    Safe because a workspace runs one stage at a time (DVC's repo lock, and the flow's workspace lock):
    a run of this workspace still RUNNING when a stage starts belongs to a process that is gone.
    """
    tag = workspace_tag(workspace)[WORKSPACE_TAG].replace("'", "\\'")
    found = client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`{WORKSPACE_TAG}` = '{tag}'", max_results=1000
    )
    ended = []
    for run in found:
        if run.info.run_id in (keep, environment().mlflow_parent_run_id):
            continue
        client.set_tag(run.info.run_id, "tp.ended_by", "start-of-stage cleanup: its process ended without closing it")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    if ended:
        print(
            f"tracking: ended {len(ended)} orphaned run(s) of this workspace as KILLED: {', '.join(ended)}",
            file=sys.stderr,
        )
    return ended
