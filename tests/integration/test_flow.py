"""The Prefect flow end to end on a small real subset, then the DVC no-op and partial-rerun guarantees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from filelock import FileLock

from benchmarks.workspace import dvc
from components.config import load_params, write_overrides
from tests.integration.conftest import make_tiny_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flowers_source, prefect_harness):
    from flows.training import training_flow

    workspace = make_tiny_workspace(tmp_path_factory.mktemp("ws"), flowers_source)
    result = training_flow(workdir=str(workspace))
    return workspace, result


def mlflow_client(workspace: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")


def test_flow_runs_every_stage_and_reports_sane_metrics(trained):
    workspace, result = trained
    assert [s["stage"] for s in result["stages"]] == [
        "ingest",
        "validate",
        "augment",
        "train_head",
        "finetune",
        "evaluate",
    ]
    assert all(s["ran"] for s in result["stages"])
    metrics = json.loads((workspace / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["n_test"] > 0
    # Two visually distinct flower classes: a real model beats chance comfortably.
    assert metrics["accuracy"] > 0.6
    for report in [
        "reports/ingest.json",
        "reports/validation/summary.json",
        "reports/augment/preview.png",
        "reports/train_head/history.csv",
        "reports/finetune/history.csv",
        "reports/evaluate/confusion_matrix.png",
    ]:
        assert (workspace / report).is_file(), report


def test_flow_registers_first_model_as_champion_with_tracked_runs(trained):
    workspace, result = trained
    client = mlflow_client(workspace)
    versions = client.search_model_versions("name='image-classifier'")
    assert len(versions) == 1
    champion = client.get_model_version_by_alias("image-classifier", "champion")
    assert champion.version == versions[0].version
    stages = {
        run.data.tags.get("stage")
        for exp in client.search_experiments()
        for run in client.search_runs([exp.experiment_id])
    }
    assert {"train_head", "finetune", "evaluate"} <= stages
    assert result["promotion"]["promoted"] is True
    # The new champion is exported, and the TFLite conversion answers like the Keras model.
    assert result["export"]["top1_agreement"] >= 0.9
    assert (workspace / "models/export/export.json").is_file()
    artifacts = {a.path for a in client.list_artifacts(result["promotion"]["run_id"], "export")}
    assert any(path.endswith(".tflite") for path in artifacts), artifacts


def test_second_run_with_nothing_changed_skips_every_stage(trained):
    from flows.training import training_flow

    workspace, _ = trained
    again = training_flow(workdir=str(workspace))
    assert again["all_skipped"]
    assert len(mlflow_client(workspace).search_model_versions("name='image-classifier'")) == 1


def test_dvc_repro_after_the_flow_is_a_no_op(trained):
    workspace, _ = trained
    out = dvc(workspace, "repro").stdout
    assert "Data and pipelines are up to date" in out, out
    assert "Running stage" not in out


def test_run_refuses_while_another_holds_the_workspace(trained):
    from flows.training import LOCK_FILE, training_flow

    workspace, _ = trained
    with FileLock(str(workspace / LOCK_FILE)):
        with pytest.raises(RuntimeError, match="another training run"):
            training_flow(workdir=str(workspace))


def test_changed_finetune_param_reruns_only_finetune_and_evaluate(trained):
    workspace, _ = trained
    current = load_params(workspace / "params.yaml").finetune.learning_rate
    write_overrides(workspace / "params.yaml", [f"finetune.learning_rate={current * 1.5}"])
    changed = json.loads(dvc(workspace, "status", "--json").stdout)
    assert set(changed) == {"finetune"}, changed  # evaluate changes only once finetune's output does
    rerun = dvc(workspace, "repro").stdout
    ran = {
        stage
        for stage in ["ingest", "validate", "augment", "train_head", "finetune", "evaluate"]
        if f"Running stage '{stage}'" in rerun
    }
    assert ran == {"finetune", "evaluate"}, rerun


def test_a_run_refused_by_the_lock_changes_nothing(trained):
    from components.config import overrides_from_strings
    from flows.training import LOCK_FILE, training_flow

    workspace, _ = trained
    before = (workspace / "params.yaml").read_bytes()
    with FileLock(str(workspace / LOCK_FILE)):
        with pytest.raises(RuntimeError, match="another training run"):
            training_flow(
                workdir=str(workspace),
                source=str(workspace / "elsewhere"),
                overrides=overrides_from_strings(["evaluate.worst_examples=3"]),
            )
    assert (workspace / "params.yaml").read_bytes() == before


def test_set_runs_an_experiment_and_a_run_cache_restore_announces_nothing(trained):
    from components.config import overrides_from_strings
    from flows.training import training_flow

    workspace, _ = trained
    before = {name: (workspace / name).read_bytes() for name in ("params.yaml", "dvc.lock", "metrics.json")}
    one_off = training_flow(
        workdir=str(workspace),
        overrides=overrides_from_strings(["evaluate.worst_examples=2"]),
        experiment="fewer-examples",
    )
    assert {s["stage"] for s in one_off["stages"] if s["ran"]} == {"evaluate"}
    assert one_off["experiment"] == "fewer-examples" and one_off["metrics"] is not None
    # Run in DVC's temporary copy: the workspace's settings, lock and outputs were never written.
    assert {name: (workspace / name).read_bytes() for name in before} == before
    shown = json.loads(dvc(workspace, "exp", "show", "--json").stdout)
    names = {
        exp.get("name")
        for rev in shown
        for exp in (rev.get("experiments") or [])
        for exp in ([exp] + (exp.get("revs") or []))
    }
    assert "fewer-examples" in json.dumps(shown), names
    assert training_flow(workdir=str(workspace))["all_skipped"]  # the main line is as it was
    # The same setting on the main line: DVC restores the experiment's evaluate outputs from its run-cache.
    # That promotion record was not made by this flow run, so it is neither exported nor announced again.
    original = load_params(workspace / "params.yaml").evaluate.worst_examples
    write_overrides(workspace / "params.yaml", ["evaluate.worst_examples=2"])
    restored = training_flow(workdir=str(workspace))
    assert [s["stage"] for s in restored["stages"] if s["ran"]] == ["evaluate"]
    assert restored["export"] is None and not restored["promoted_now"]
    write_overrides(workspace / "params.yaml", [f"evaluate.worst_examples={original}"])
    training_flow(workdir=str(workspace))  # back to the saved settings for the tests below


def test_queued_dvc_experiments_share_the_store_and_show_side_by_side(trained):
    import time

    from benchmarks.workspace import git

    workspace, _ = trained
    git(workspace, "add", "-A")
    git(workspace, "commit", "-qm", "baseline for experiments", "--allow-empty")
    versions_before = len(mlflow_client(workspace).search_model_versions("name='image-classifier'"))
    for name, bins in (("bins5", 5),):  # one queued experiment beside the workspace
        dvc(workspace, "exp", "run", "--queue", "-S", f"evaluate.calibration_bins={bins}", "-n", name)
    dvc(workspace, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and any(
        s in dvc(workspace, "queue", "status").stdout for s in ("Running", "Queued")
    ):
        time.sleep(3)
    status = dvc(workspace, "queue", "status").stdout
    assert status.count("Success") >= 1, status

    shown = dvc(workspace, "exp", "show", "--json").stdout
    experiments = {
        exp["name"]: exp for rev in json.loads(shown) for exp in (rev.get("experiments") or []) if exp.get("name")
    }
    assert {"bins5"} <= set(experiments), shown[:2000]
    for name in ("bins5",):
        metrics = experiments[name]["revs"][0]["data"]["metrics"]["metrics.json"]["data"]
        assert 0.0 <= metrics["accuracy"] <= 1.0 and "ece" in metrics, metrics
    # The experiment tracked into the workspace's one MLflow store (not a fresh one in DVC's temp
    # folders), as evaluate runs nested under one parent per experiment; neither registered a model.
    client = mlflow_client(workspace)
    parents = {
        run.data.tags.get("dvc_experiment"): run.info.run_id
        for exp in client.search_experiments()
        for run in client.search_runs([exp.experiment_id])
        if run.data.tags.get("dvc_experiment")
    }
    assert {"bins5"} <= set(parents), parents
    nested = [
        run
        for exp in client.search_experiments()
        for run in client.search_runs([exp.experiment_id])
        if run.data.tags.get("mlflow.parentRunId") == parents["bins5"]
    ]
    assert {run.data.tags.get("stage") for run in nested} == {"evaluate"}
    assert len(client.search_model_versions("name='image-classifier'")) == versions_before

    diff = dvc(workspace, "plots", "diff", "bins5", "--json").stdout  # against the workspace
    assert "bins5" in diff and "workspace" in diff, diff[:2000]


def test_new_data_is_checked_for_drift_and_the_alert_policy_holds_training(trained, flowers_source):
    import shutil

    from flows.training import training_flow
    from tests.conftest import FLOWERS

    workspace, _ = trained
    write_overrides(workspace / "params.yaml", ["drift.policy=alert"])  # read by the flow only: no stage reruns
    for name in ("daisy", "sunflowers"):
        for extra in sorted((FLOWERS / name).iterdir())[40:43]:
            shutil.copy2(extra, flowers_source / name / extra.name)
    result = training_flow(workdir=str(workspace))
    drift = result["drift"]
    assert drift is not None and drift["new_images"] >= 1 and drift["retrain"] is False, drift
    assert (workspace / "reports/drift.json").is_file()
    held = {s["stage"] for s in result["stages"] if s.get("where") == "held by drift policy"}
    assert held == {"augment", "train_head", "finetune", "evaluate"}, result["stages"]
