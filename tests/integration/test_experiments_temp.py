"""`--set` experiments run in DVC's temporary copy: no crash can leave their settings in the workspace.

A tiny real workspace (2 classes x 12 images, 64 px) is reproduced once with `dvc repro`. Then the
flow's CLI runs `--set` experiments as subprocesses, as a user would: one is killed with SIGKILL
(with every process it started) while training, one completes. The workspace's params.yaml, dvc.lock
and DVC outputs must be byte-identical afterwards; the completed experiment is in `dvc exp show`
and in MLflow. Last, the deployment entry points run in-process through Prefect: an allowed run form
scores into the output folder and runs an experiment, a form asking for more is refused.
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

from benchmarks.workspace import dvc, tool_env
from components.config import overrides_from_strings, write_overrides
from components.run_forms import RunFormRefused
from tests.conftest import FLOWERS, copy_subset
from tests.integration.conftest import make_tiny_workspace
from tests.integration.test_faults import FAULT_SETTINGS

pytestmark = pytest.mark.slow

SMALL = FAULT_SETTINGS  # stages that run, not models that learn
OUTPUTS = ("data", "models", "reports", "metrics.json")
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} not found (set TP_SHARED_DIR)")
    root = tmp_path_factory.mktemp("experiments")
    for name in ("daisy", "sunflowers"):
        copy_subset(FLOWERS / name, root / "source" / name, 12)
    ws = make_tiny_workspace(root / "ws", root / "source", **SMALL)
    proc = dvc(ws, "repro", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return ws


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


def test_a_set_experiment_killed_mid_run_leaves_the_workspace_byte_identical(workspace: Path) -> None:
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


def test_a_set_experiment_after_a_kill_completes_and_is_tracked_without_touching_the_workspace(
    workspace: Path,
) -> None:
    from mlflow import MlflowClient

    before = snapshot(workspace)
    log = workspace.parent / "completed.log"
    proc = flow_cli(workspace, log, "--set", "evaluate.worst_examples=2", "--name", "fewer-examples")
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text(errors="replace")[-4000:]
    assert snapshot(workspace) == before

    shown = json.loads(dvc(workspace, "exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp for rev in shown for exp in (rev.get("experiments") or []) if exp.get("name")}
    assert "fewer-examples" in experiments, list(experiments)
    data = experiments["fewer-examples"]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["evaluate"]["worst_examples"] == 2
    assert 0.0 <= data["metrics"]["metrics.json"]["data"]["accuracy"] <= 1.0

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]
    parents = [run for run in runs if run.data.tags.get("dvc_experiment") == "fewer-examples"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [r.data.tags for r in runs]
    nested = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {run.data.tags.get("stage") for run in nested} == {"evaluate"}


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_deployment_entry_points_run_an_allowed_form_and_refuse_the_rest(
    workspace: Path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.predict import batch_predict_deployment
    from flows.training import training_deployment

    monkeypatch.chdir(workspace)  # a worker runs in its workspace (prefect.yaml's pull step)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", tool_env()["PATH"])
    images = workspace.parent / "source" / "daisy"
    write_overrides(workspace / "params.yaml", [f"deployments.input_roots={json.dumps([str(images.parent)])}"])
    before = snapshot(workspace)

    with pytest.raises(RunFormRefused, match="out_csv"):
        batch_predict_deployment(inputs=str(images), out_csv="../../escaped.csv")
    with pytest.raises(RunFormRefused, match="ingest.allow_private_hosts: ingest is a limit"):
        training_deployment(overrides=overrides_from_strings(["ingest.allow_private_hosts=true"]))
    assert snapshot(workspace) == before and not (workspace.parent / "escaped.csv").exists()

    scored = batch_predict_deployment(inputs=str(images), out_csv="daisy.csv")
    assert scored["out_csv"] == str(workspace.resolve() / "predictions" / "daisy.csv") and scored["n_images"] == 12
    result = training_deployment(
        overrides=overrides_from_strings(["evaluate.worst_examples=3"]), experiment="from-a-run-form"
    )
    assert result["experiment"] == "from-a-run-form"
    assert {s["stage"] for s in result["stages"] if s["ran"]} == {"evaluate"}
    assert snapshot(workspace) == before
