"""MLflow connection helpers shared by the stages that track or register.

The tracking URI comes from params (`tracking.uri`), unless MLFLOW_TRACKING_URI is set in the
environment: servers and their credentials are deployment settings, not project settings.
Credentials never reach logs, params or tags: use `redact` before showing a URI.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from components.config import TrackingConfig
from components.errors import Unavailable
from components.settings import environment, workspace_root

T = TypeVar("T")


def resolve_tracking_uri(config: TrackingConfig, workspace: str | Path | None = None) -> str:
    """The URI to use; a relative SQLite path is anchored at the main workspace (settings.workspace_root)."""
    uri = environment().tracking_uri or config.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        base = Path(workspace) if workspace else workspace_root()
        uri = prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def redact(uri: str) -> str:
    """Drop user and password from a URI before it is logged or shown."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


# Clean tracking URI -> how messages show it (the user's URI, credentials as ***), and whether the
# credential variables were set from a URI (so another server never receives them).
_SHOWN: dict[str, str] = {}
_CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
_credentials_from_uri = False


def use_tracking_uri(uri: str) -> str:
    """Point MLflow at `uri`; a `user:password@` in it moves to MLflow's credential variables.

    MLflow prints and stores the tracking URI in places we do not control (the "View run at"
    links on stdout, for one), so it must never hold the secret. Returns the URI MLflow now uses.
    """
    import mlflow

    global _credentials_from_uri
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
        _credentials_from_uri = True
        host = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
        clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
        _SHOWN[clean] = redact(uri)
        uri = clean
    elif _credentials_from_uri:
        for name in _CREDENTIAL_VARS:
            os.environ.pop(name, None)
        _credentials_from_uri = False
    mlflow.set_tracking_uri(uri)
    return uri


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI (default: MLflow's current one) as messages may show it: no credentials."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    return _SHOWN.get(uri) or redact(uri)


def probe_server(uri: str, timeout_s: float = 10.0) -> None:
    """Raise ConnectionError (naming host:port, never credentials) when an http(s) tracking server is down.

    One quick request of our own: MLflow's client would otherwise retry a refused connection for
    minutes (its backoff is sized for rate limits) before the stage's own retries even start.
    Any HTTP answer counts as reachable; only network failures count as down.
    """
    import requests

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        requests.get(health, timeout=timeout_s, allow_redirects=False)
    except requests.Timeout:
        raise ConnectionError(f"no answer from {netloc} within {timeout_s:g} s") from None
    except requests.RequestException as exc:
        known = ("Connection refused", "Name or service not known", "No route to host", "Network is unreachable")
        reason = next((r for r in known if r in str(exc)), "cannot connect")
        raise ConnectionError(f"{reason.lower()}: {netloc}") from None


def setup_mlflow(config: TrackingConfig, workspace: str | Path | None = None) -> str:
    """Point MLflow at the tracking store and make sure the experiment exists; return its id."""
    import mlflow

    uri = use_tracking_uri(resolve_tracking_uri(config, workspace))
    probe_server(uri)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(config.experiment, artifact_location=local_artifact_location(uri))


def local_artifact_location(uri: str) -> str | None:
    """With a SQLite store, artifacts go to `mlruns/` beside the database, not into whatever folder is current.

    A tracking server decides its own artifact location (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()


# --- retries ------------------------------------------------------------------------------------

# MlflowException codes worth another try: the server or the database was busy or unreachable.
TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
}


class TrackingUnavailable(Unavailable):
    """MLflow stayed unreachable (or kept failing) after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    first_wait_s: float = 2.0
    max_wait_s: float = 30.0

    @classmethod
    def from_config(cls, config: TrackingConfig) -> RetryPolicy:
        return cls(attempts=config.retry_attempts, first_wait_s=config.retry_backoff_s)


def is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    missing = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    return isinstance(exc, OSError) and not isinstance(exc, missing)  # requests' errors are OSErrors


def scrub_credentials(text: str) -> str:
    """Hide any `user:password@` inside URLs in free text (error messages, tag values)."""
    return re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@", r"\1***@", str(text))


def with_retries(what: str, fn: Callable[..., T], *args: Any, policy: RetryPolicy = RetryPolicy(), **kwargs: Any) -> T:
    """Call an MLflow function, retrying transient failures with exponential backoff.

    Raises TrackingUnavailable naming the (redacted) server once the attempts are used up.
    """
    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential(multiplier=policy.first_wait_s, max=policy.max_wait_s),
        retry=retry_if_exception(is_transient),
        reraise=True,
    )
    try:
        return retrying(fn, *args, **kwargs)
    except Exception as exc:
        if not is_transient(exc):
            raise
        server = shown_uri()
        detail = scrub_credentials(getattr(exc, "message", None) or exc)
        raise TrackingUnavailable(
            f"MLflow at {server} failed to {what} after {policy.attempts} attempts: {detail}"
        ) from None


# --- runs --------------------------------------------------------------------------------------
# A stage's run is MLflow's active run (mlflow.start_run: context tags, system metrics) for exactly the
# stage's `with stage_run(...)` block; parent and pipeline runs, made in the flow's long-lived process,
# are made with the client and passed by id.

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
        _end_stage_run(client, run_id, "FAILED", RetryPolicy(attempts=1))  # best effort: the error is what counts
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


def mlflow_epoch_logger(client: Any, run_id: str, first_epoch: int = 1, policy: RetryPolicy = RetryPolicy()) -> Any:
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
