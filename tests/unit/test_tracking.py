"""Credentials in the tracking URI reach MLflow's auth, never the URI MLflow prints or stores."""

from __future__ import annotations

import mlflow
import pytest

from components.core.tracking_connection import shown_uri, use_tracking_uri


@pytest.fixture(autouse=True)
def _restore_mlflow(monkeypatch: pytest.MonkeyPatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    yield
    use_tracking_uri("sqlite:///:memory:")  # also drops credential variables set from a URI
    mlflow.set_tracking_uri(None)


def test_password_in_the_uri_moves_to_mlflow_credentials_and_out_of_every_shown_uri():
    clean = use_tracking_uri("https://ci%40corp:p%2Fss-word@mlflow.example.com:8443/base")
    assert clean == mlflow.get_tracking_uri() == "https://mlflow.example.com:8443/base"
    import os

    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("ci@corp", "p/ss-word")
    assert shown_uri() == "https://***@mlflow.example.com:8443/base"  # says credentials are in use, not which


def test_credentials_from_one_server_are_not_sent_to_the_next():
    import os

    use_tracking_uri("http://alice:secret@10.0.0.1:5000")
    use_tracking_uri("http://10.0.0.2:5000")
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ and shown_uri() == "http://10.0.0.2:5000"


def test_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    import mlflow

    from components.core.config import TrackingConfig
    from components.core.tracking_connection import setup_mlflow

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    store.mkdir()
    experiment_id = setup_mlflow(TrackingConfig(uri=f"sqlite:///{store}/mlflow.db", experiment="placement"))
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location == (store / "mlruns").as_uri()
    assert not (elsewhere / "mlruns").exists()


def test_stage_start_ends_this_workspaces_orphaned_runs_as_killed(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from components.core.config import TrackingConfig
    from components.core.pipeline_runs import workspace_tag
    from components.core.tracking import stage_run
    from components.core.tracking_connection import setup_mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics_interval_s=0)
    experiment = setup_mlflow(config)
    client = MlflowClient()

    def left_running(workspace=tmp_path):  # what a stage process killed mid-run leaves behind
        return client.create_run(experiment, tags=workspace_tag(workspace)).info.run_id

    killed_stage, other = left_running(), left_running(tmp_path / "elsewhere")
    with stage_run(config, "finetune", run_id=killed_stage) as (_, resumed, _):  # resuming keeps its own run
        assert resumed == killed_stage and client.get_run(killed_stage).info.status == "RUNNING"
    orphan = left_running()
    with stage_run(config, "evaluate") as (_, fresh, _):
        ended = client.get_run(orphan)
        assert ended.info.status == "KILLED" and "cleanup" in ended.data.tags["tp.ended_by"]
        assert client.get_run(other).info.status == "RUNNING"  # another workspace's run is not ours to end
        assert client.get_run(fresh).info.status == "RUNNING"
    assert client.get_run(killed_stage).info.status == client.get_run(fresh).info.status == "FINISHED"


def git(cwd, *args: str) -> str:
    import subprocess

    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_a_stage_run_is_the_active_run_with_git_context_system_metrics_and_its_parent(tmp_path, monkeypatch):
    """Nested under the pipeline's parent, tagged with the workspace's commit (the remote without its
    credentials), sampled as system metrics, and ended with the block: FINISHED, or FAILED on an error."""
    import time

    from mlflow import MlflowClient

    from components.core.config import TrackingConfig
    from components.core.tracking import log_dataset, stage_run
    from components.core.tracking_connection import setup_mlflow

    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "code")
    git(tmp_path, "remote", "add", "origin", "https://ci:s3cret@git.example.com/team/pipeline.git")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)  # restored after the test
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", raising=False)
    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics_interval_s=0.1)
    client = MlflowClient()
    parent = client.create_run(setup_mlflow(config), run_name="pipeline").info.run_id
    monkeypatch.setenv("TP_MLFLOW_PARENT_RUN_ID", parent)

    with stage_run(config, "train_head", {"data_version": "v1"}) as (_, run_id, _):
        assert mlflow.active_run().info.run_id == run_id
        time.sleep(0.6)  # a few sampling intervals
    assert mlflow.active_run() is None
    run = client.get_run(run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent
    assert (tags["stage"], tags["data_version"], tags["mlflow.runName"]) == ("train_head", "v1", "train_head")
    assert tags["mlflow.source.git.commit"] == git(tmp_path, "rev-parse", "HEAD")
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["mlflow.source.git.repoURL"] == "https://***@git.example.com/team/pipeline.git"
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    system = set(run.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    with pytest.raises(RuntimeError, match="not the active run"):  # mlflow.log_input would start a stray run
        log_dataset(run_id, tmp_path / "m.csv", None, "v1", "training")

    with pytest.raises(ValueError, match="stage broke"):
        with stage_run(config, "finetune") as (_, failed, _):
            raise ValueError("stage broke")
    assert mlflow.active_run() is None and client.get_run(failed).info.status == "FAILED"


def test_mlflows_own_git_remote_tag_loses_its_credentials():
    """MLflow tags the main script's repository itself (outside a git workspace ours are absent to override it)."""
    from components.core.tracking import _scrub_context_tags

    class Client:
        def __init__(self) -> None:
            self.tags: dict[str, str] = {}

        def set_tag(self, run_id: str, key: str, value: str) -> None:
            self.tags[key] = value

    client = Client()
    _scrub_context_tags(client, "run", {"mlflow.source.git.repoURL": "https://ci:s3cret@git.example.com/x.git"})
    assert client.tags == {"mlflow.source.git.repoURL": "https://***@git.example.com/x.git"}
    _scrub_context_tags(client := Client(), "run", {"mlflow.source.git.repoURL": "git@git.example.com:x.git"})
    assert client.tags == {}  # nothing secret: left as MLflow wrote it


def test_system_metrics_can_be_switched_off(tmp_path, monkeypatch):
    import threading

    from mlflow import MlflowClient

    from components.core.config import TrackingConfig
    from components.core.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics_interval_s=0)
    with stage_run(config, "evaluate") as (_, run_id, _):
        assert "SystemMetricsMonitor" not in {thread.name for thread in threading.enumerate()}
    assert not [key for key in MlflowClient().get_run(run_id).data.metrics if key.startswith("system/")]


def test_no_private_mlflow_api_is_used():
    """Modules that use MLflow call only its public API: no `_`-prefixed name imported from it, and no
    `obj._method` our own code does not define (e.g. Dataset._to_mlflow_entity; mlflow.log_input does that)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    trees = {
        path: ast.parse(path.read_text())
        for folder in ("components", "flows")
        for path in (root / folder).rglob("*.py")
    }
    ours = {
        node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else node.attr
        for tree in trees.values()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        or (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store))
    }

    def uses_mlflow(tree: ast.AST) -> bool:
        return any(
            (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "mlflow" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "mlflow")
            for n in ast.walk(tree)
        )

    found = []
    for path, tree in trees.items():
        if not uses_mlflow(tree):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
                parts = [*node.module.split("."), *(a.name for a in node.names)]
                found += [f"{path.name}:{node.lineno} imports {p}" for p in parts if p.startswith("_")]
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            if private and node.attr not in ours:
                found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
    assert not found, found


def test_epoch_metrics_are_retried_and_a_tracking_outage_never_stops_training(capsys):
    """A slow server: each epoch's log_batch is retried; one that stays down costs the epoch's metrics only."""
    import numpy as np

    from components.core.tracking import mlflow_epoch_logger
    from components.core.tracking_connection import RetryPolicy

    class FlakyClient:
        def __init__(self, failures: int) -> None:
            self.failures, self.logged = failures, []

        def log_batch(self, run_id, metrics):
            if self.failures:
                self.failures -= 1
                raise ConnectionError("connection reset by the tracking server")
            self.logged.append((run_id, {(m.key, m.step) for m in metrics}))

    quick = RetryPolicy(attempts=3, first_wait_s=0.01, max_wait_s=0.01)
    flaky = FlakyClient(failures=2)
    mlflow_epoch_logger(flaky, "run-1", first_epoch=1, policy=quick).on_epoch_end(0, {"loss": np.float32(0.5)})
    assert flaky.logged == [("run-1", {("loss", 1)})]

    down = FlakyClient(failures=100)
    mlflow_epoch_logger(down, "run-1", first_epoch=3, policy=quick).on_epoch_end(1, {"loss": 0.4})
    assert down.logged == [] and "epoch 4 metrics not logged to MLflow" in capsys.readouterr().out
