"""Credentials in the tracking URI reach MLflow's auth, never the URI MLflow prints or stores."""

from __future__ import annotations

import mlflow
import pytest

from components.tracking import shown_uri, use_tracking_uri


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

    from components.config import TrackingConfig
    from components.tracking import setup_mlflow

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

    from components.config import TrackingConfig
    from components.tracking import start_run, workspace_tag

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client, killed_stage, experiment = start_run(config, "train_head")  # then the process "dies": never ended
    other = client.create_run(experiment, tags={**workspace_tag(tmp_path / "elsewhere")}).info.run_id
    _, resumed, _ = start_run(config, "finetune", run_id=killed_stage)  # resuming keeps its own run
    assert client.get_run(killed_stage).info.status == "RUNNING"
    _, fresh, _ = start_run(config, "evaluate")
    orphan = MlflowClient().get_run(resumed)
    assert orphan.info.status == "KILLED" and "cleanup" in orphan.data.tags["tp.ended_by"]
    assert client.get_run(other).info.status == "RUNNING"  # another workspace's run is not ours to end
    assert client.get_run(fresh).info.status == "RUNNING"


def test_epoch_metrics_are_retried_and_a_tracking_outage_never_stops_training(capsys):
    """A slow server: each epoch's log_batch is retried; one that stays down costs the epoch's metrics only."""
    import numpy as np

    from components.tracking import RetryPolicy, mlflow_epoch_logger

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
