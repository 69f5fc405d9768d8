"""What the flows ask of Prefect: one run per workspace (global concurrency limit), artifacts, typed run forms.

One Prefect test server for the module (~20 s to start); nothing trains.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from components.core.orchestration_config import OrchestrationConfig
from flows.limits import WorkspaceBusy, workspace_slot

LOCK = Path(".tp") / "training.lock"


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: object) -> None:
        self.lines.append(message % args)


@pytest.mark.slow
def test_overlapping_runs_wait_on_the_prefect_limit_instead_of_failing(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    settings = OrchestrationConfig(concurrency_limit="test-workspace", workspace_wait_s=30)
    # Two workspaces, so only the Prefect limit (not a shared lock file) can make the second run wait.
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    holding, released_at = threading.Event(), []

    def nightly() -> None:
        with workspace_slot(first, LOCK, settings, Log()):
            holding.set()
            time.sleep(2)
            released_at.append(time.monotonic())

    thread = threading.Thread(target=nightly)
    thread.start()
    assert holding.wait(30)
    with get_client(sync_client=True) as client:  # made on first use: one slot
        limit = client.read_global_concurrency_limit_by_name("test-workspace")
    assert (limit.limit, limit.active_slots) == (1, 1)
    for no_long_wait in (0.5, 0):  # 0: one try
        with pytest.raises(WorkspaceBusy, match="another training run is using the workspace"):
            with workspace_slot(second, LOCK, settings.model_copy(update={"workspace_wait_s": no_long_wait}), Log()):
                pass
    with workspace_slot(second, LOCK, settings, Log()):  # waits for the nightly run, then runs
        assert released_at and time.monotonic() >= released_at[0]
    thread.join()
    with workspace_slot(second, LOCK, settings.model_copy(update={"workspace_wait_s": 0}), Log()):
        pass  # a free slot is taken at once, also without waiting
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("test-workspace").active_slots == 0


def test_without_a_prefect_server_runs_wait_on_the_workspace_lock(monkeypatch, tmp_path):
    from filelock import FileLock

    import flows.limits

    monkeypatch.setattr(flows.limits, "prefect_server_configured", lambda: False)
    monkeypatch.setattr(flows.limits, "ensure_concurrency_limit", lambda name: pytest.fail("no server to ask"))
    settings = OrchestrationConfig(workspace_wait_s=0.5)
    log = Log()
    (tmp_path / ".tp").mkdir()
    with FileLock(str(tmp_path / LOCK)):
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy, match="waited 0.5 s"):
            with workspace_slot(tmp_path, LOCK, settings, log):
                pass
        assert time.monotonic() - started >= 0.4  # it waited, then gave up
    with workspace_slot(tmp_path, LOCK, settings, log):
        pass
    assert "queue on its file lock" in log.lines[0]


@pytest.mark.slow
def test_runs_publish_per_class_metrics_links_and_progress(prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.run_records import publish_artifacts, report_progress, start_progress

    result = {
        "metrics": {"accuracy": 0.9, "recall_daisy": 1.0, "precision_daisy": 0.8, "f1_daisy": 0.89, "recall_rose": 0.8},
        "mlflow_run_id": "abc123",
        "promotion": {"registered_model": "image-classifier", "version": "7", "promoted": True},
    }

    @flow
    def pipeline() -> str:
        from prefect.runtime import flow_run

        progress = start_progress("stage 0 of 6")
        report_progress(progress, 2, "validate")
        publish_artifacts(tmp_path, {"uri": "sqlite:///mlflow.db"}, result, Log())
        return str(flow_run.get_id())

    run_id = pipeline()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    by_key = {a.key: a for a in found}
    assert by_key["training-progress"].data == pytest.approx(100 * 2 / 6)
    assert "stage 2 of 6: validate" in by_key["training-progress"].description
    table = by_key["test-metrics-per-class"].data
    assert '"class": "daisy"' in table and '"recall": 0.8' in table and "accuracy" not in table
    assert by_key["mlflow-run"].data == "[MLflow run abc123](runs:/abc123)"
    assert "models:/image-classifier/7" in by_key["mlflow-model-version"].data


def test_links_open_the_tracking_server_s_ui_without_its_credentials(monkeypatch):
    from types import SimpleNamespace

    import mlflow

    from flows.summary import tracking_links

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:secret@mlflow.example:5000/")
    run = SimpleNamespace(info=SimpleNamespace(experiment_id="4"))
    monkeypatch.setattr(mlflow.MlflowClient, "get_run", lambda self, run_id: run)
    links = tracking_links({}, ".", "r1", {"registered_model": "m", "version": "2", "promoted": False})
    assert [link["link"] for link in links] == [
        "https://mlflow.example:5000/#/experiments/4/runs/r1",
        "https://mlflow.example:5000/#/models/m/versions/2",
    ]
    assert "secret" not in repr(links)


def test_the_stage_run_form_offers_exactly_the_pipeline_s_stages():
    from prefect.exceptions import ParameterTypeError

    from flows.dvc_workspace import STAGES
    from flows.training import stage_flow

    assert stage_flow.parameters.properties["stage"]["enum"] == list(STAGES)
    assert STAGES == ("ingest", "validate", "augment", "train_head", "finetune", "evaluate")
    assert stage_flow.validate_parameters({"stage": "finetune"})["stage"] == "finetune"
    with pytest.raises(ParameterTypeError):
        stage_flow.validate_parameters({"stage": "deploy"})


def test_a_failed_run_ends_its_mlflow_parent_run_failed_and_unsets_it(monkeypatch):
    """No server needed: the tasks are replaced by what they were called with."""
    import os
    from types import SimpleNamespace

    from flows import run_records

    calls = []

    def step_task(step, limits):
        return lambda *args: calls.append((step.name, args)) or "parent-1"

    monkeypatch.setattr(run_records, "step_task", step_task)
    monkeypatch.delenv(run_records.PARENT_RUN_VARIABLE, raising=False)
    params = SimpleNamespace(tracking=SimpleNamespace(model_dump=lambda: {"uri": "sqlite:///m.db"}), orchestration=None)
    with pytest.raises(KeyError), run_records.pipeline_run(params, Path("/ws"), "exp-1") as parent:
        assert os.environ[run_records.PARENT_RUN_VARIABLE] == parent == "parent-1"  # the stages nest under it
        raise KeyError("a stage task failed")
    assert [name for name, _ in calls] == ["mlflow-pipeline-run", "mlflow-pipeline-run-end"]
    assert calls[1][1][2:] == ("parent-1", "FAILED", {})
    assert run_records.PARENT_RUN_VARIABLE not in os.environ


def test_preflight_runs_only_when_a_stage_that_builds_the_model_may_run():
    from flows.dvc_workspace import needs_preflight

    assert not needs_preflight(set()) and not needs_preflight({"evaluate"})  # nothing, or an evaluate-only rerun
    for changed in ({"ingest"}, {"validate"}, {"augment"}, {"train_head"}, {"finetune", "evaluate"}):
        assert needs_preflight(changed), changed  # it, or what follows it, builds the backbone


def test_an_experiment_s_settings_name_the_stages_that_read_them():
    from flows.dvc_workspace import stages_reading

    repo = Path(__file__).resolve().parents[2]  # the project's own dvc.yaml
    assert stages_reading(repo, ["evaluate.worst_examples"]) == {"evaluate"}
    assert stages_reading(repo, ["finetune.learning_rate"]) == {"finetune"}
    assert stages_reading(repo, ["model.image_size"]) >= {"validate", "augment", "train_head", "finetune"}
    assert stages_reading(repo, ["project"]) == {"ingest", "validate", "augment", "train_head", "finetune", "evaluate"}
    assert stages_reading(repo, ["orchestration.flow_timeout_s"]) == set()  # read by the flow, by no stage
