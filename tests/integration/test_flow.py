"""The Prefect flow end to end on a small real subset, then the DVC no-op and partial-rerun guarantees.

One workspace is trained once (the module's fixture) and every later test works on it, in file order:
reruns, locks, `--set` experiments (one killed with SIGKILL through the CLI, as an OOM kill or a lost
machine would; then one completed in-process), the deployment entry points, queued experiments, drift.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from benchmarks.workspace import dvc, tool_env
from components.core.config import load_params
from components.core.overrides import overrides_from_strings, write_overrides
from components.lifecycle.run_forms import RunFormRefused
from tests.integration.conftest import make_tiny_workspace

pytestmark = pytest.mark.slow
OUTPUTS = ("data", "models", "reports", "metrics.json")
RUN_TIMEOUT_S = 900


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


def test_second_run_with_nothing_changed_skips_every_stage(trained, monkeypatch: pytest.MonkeyPatch):
    from flows import dvc_workspace, stage_tasks, training

    workspace, _ = trained
    commands = []
    run_command = dvc_workspace.run_command
    for module in (dvc_workspace, stage_tasks):
        monkeypatch.setattr(
            module, "run_command", lambda cmd, *a, **k: commands.append(cmd) or run_command(cmd, *a, **k)
        )
    again = training.training_flow(workdir=str(workspace))
    assert again["all_skipped"]
    assert [cmd for cmd in commands if cmd[1] == "status"] == [["dvc", "status", "--json"]]  # one, for all six
    assert not [cmd for cmd in commands if "components.preflight" in cmd]  # nothing runs: no settings to check
    assert len(mlflow_client(workspace).search_model_versions("name='image-classifier'")) == 1


def test_dvc_repro_after_the_flow_is_a_no_op(trained):
    workspace, _ = trained
    out = dvc(workspace, "repro").stdout
    assert "Data and pipelines are up to date" in out, out
    assert "Running stage" not in out


def test_run_refuses_while_another_holds_the_workspace(trained):
    from flows.dvc_workspace import LOCK_FILE
    from flows.training import training_flow

    workspace, _ = trained
    with FileLock(str(workspace / LOCK_FILE)):
        with pytest.raises(RuntimeError, match="another training run"):
            training_flow(workdir=str(workspace))


def test_changed_finetune_param_reruns_only_finetune_and_evaluate(trained):
    workspace, _ = trained
    assert load_params(workspace / "params.yaml").finetune.learning_rate != 1.5e-4
    write_overrides(workspace / "params.yaml", ["finetune.learning_rate=1.5e-4"])  # one rate at every size
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
    from flows.dvc_workspace import LOCK_FILE
    from flows.training import training_flow

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


def snapshot(ws: Path) -> dict[str, str]:
    """sha256 of params.yaml, dvc.lock and every file of the DVC outputs (the workspace's state)."""
    paths = [ws / "params.yaml", ws / "dvc.lock"]
    for name in OUTPUTS:
        target = ws / name
        paths += sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return {
        str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "absent"
        for p in paths
        if not p.name.startswith("run_summary.")  # the flow's own summary of its last run, not a DVC output
    }


def flow_cli(ws: Path, log: Path, *args: str) -> subprocess.Popen:
    """`python -m flows.training --workdir WS ARGS` in a session of its own (so all it starts can be killed)."""
    env = tool_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(
        PREFECT_HOME=str(ws.parent / "prefect_home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
        PYTHONPATH=str(ws),  # the workspace's copy of the project, as a user's clone runs it
    )
    return subprocess.Popen(
        [sys.executable, "-m", "flows.training", "--workdir", str(ws), *args],
        cwd=ws,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_line(proc: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"never saw {text!r} (exit {proc.poll()}):\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)


def test_a_set_experiment_killed_mid_run_leaves_the_workspace_byte_identical(trained):
    workspace, _ = trained
    before = snapshot(workspace)
    log = workspace.parent / "killed.log"
    proc = flow_cli(workspace, log, "--set", "train_head.epochs=2", "--name", "killed")
    wait_for_line(proc, log, "Running stage 'train_head'")
    time.sleep(3)  # training under way
    os.killpg(proc.pid, signal.SIGKILL)  # the flow, DVC and the stage process: as an OOM kill or a lost machine
    proc.wait(timeout=60)

    assert snapshot(workspace) == before, log.read_text(errors="replace")[-3000:]
    status = dvc(workspace, "status", "--json").stdout
    assert json.loads(status or "{}") == {}, status  # DVC agrees: settings, lock and outputs are as reproduced


def test_set_after_a_kill_runs_an_experiment_and_a_run_cache_restore_announces_nothing(trained):
    from flows.training import training_flow

    workspace, _ = trained
    before = snapshot(workspace)
    one_off = training_flow(
        workdir=str(workspace),
        overrides=overrides_from_strings(["evaluate.worst_examples=2"]),
        experiment="fewer-examples",
    )
    assert {s["stage"] for s in one_off["stages"] if s["ran"]} == {"evaluate"}
    assert one_off["experiment"] == "fewer-examples" and one_off["metrics"] is not None
    # Run in DVC's temporary copy: the workspace's settings, lock and outputs were never written.
    assert snapshot(workspace) == before
    shown = json.loads(dvc(workspace, "exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp for rev in shown for exp in (rev.get("experiments") or []) if exp.get("name")}
    assert "fewer-examples" in experiments, list(experiments)
    data = experiments["fewer-examples"]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["evaluate"]["worst_examples"] == 2
    assert 0.0 <= data["metrics"]["metrics.json"]["data"]["accuracy"] <= 1.0
    # Tracked in the workspace's store: one finished parent for the experiment, evaluate nested under it.
    client = mlflow_client(workspace)
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    parents = [run for run in runs if run.data.tags.get("dvc_experiment") == "fewer-examples"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [r.data.tags for r in runs]
    nested = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {run.data.tags.get("stage") for run in nested} == {"evaluate"}

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


def test_deployment_entry_points_run_an_allowed_form_and_refuse_the_rest(
    trained, flowers_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.predict import batch_predict_deployment
    from flows.training import training_deployment

    workspace, _ = trained
    monkeypatch.chdir(workspace)  # a worker runs in its workspace (prefect.yaml's pull step)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", tool_env()["PATH"])
    images = flowers_source / "daisy"
    write_overrides(workspace / "params.yaml", [f"deployments.input_roots={json.dumps([str(flowers_source)])}"])
    before = snapshot(workspace)

    with pytest.raises(RunFormRefused, match="out_csv"):
        batch_predict_deployment(inputs=str(images), out_csv="../../escaped.csv")
    with pytest.raises(RunFormRefused, match="ingest.allow_private_hosts: ingest is a limit"):
        training_deployment(overrides=overrides_from_strings(["ingest.allow_private_hosts=true"]))
    assert snapshot(workspace) == before and not (workspace.parent / "escaped.csv").exists()

    scored = batch_predict_deployment(inputs=str(images), out_csv="daisy.csv")
    n_daisies = sum(1 for p in images.iterdir() if p.is_file())
    assert scored["out_csv"] == str(workspace.resolve() / "predictions" / "daisy.csv")
    assert scored["n_images"] == n_daisies
    # The setting of the "fewer-examples" experiment above: DVC restores evaluate from its run-cache (the
    # run form is what is tested here, not another evaluation: that costs half a minute).
    result = training_deployment(
        overrides=overrides_from_strings(["evaluate.worst_examples=2"]), experiment="from-a-run-form"
    )
    assert result["experiment"] == "from-a-run-form"
    assert {s["stage"] for s in result["stages"] if s["ran"]} == {"evaluate"}
    assert snapshot(workspace) == before


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
