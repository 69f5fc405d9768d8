"""The MLflow tracking server goes away and comes back, with credentials in the tracking URI.

One real `mlflow server` on loopback, one tiny workspace: train up to finetune against it, stop the
server, watch evaluate (and a fresh train_head/finetune) fail with the server named but redacted,
start the server again on the same store and port, and `dvc repro` only evaluates. The secret must
show up nowhere: not in any stage's output, the workspace files, or anything the server stored.

Then the same trained workspace takes SIGKILLs (tracking to its own sqlite store from here on):
`dvc repro` killed during train_head reruns it cleanly, and finetune killed after an epoch resumes
from the next one. They share this module's workspace because training one costs a minute.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from benchmarks.workspace import dvc
from tests.datakit import make_classes
from tests.evalkit import free_port, start_mlflow_server, stop
from tests.integration.conftest import make_tiny_workspace
from tests.integration.test_faults import FAULT_SETTINGS, PYTHON, kill_when, runs_named, stage_env, start

pytestmark = pytest.mark.slow
SECRET = "s3cr3t-token"
MODEL_NAME = "image-classifier"


def run(cmd: list[str], ws: Path, env: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=1200)
    return {"code": proc.returncode, "out": proc.stdout + proc.stderr, "seconds": time.monotonic() - started}


def stage_cmd(ws: Path, stage: str, **replace: str) -> list[str]:
    """The stage's command from dvc.yaml, with some flags pointed elsewhere."""
    cmd = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    cmd[0] = sys.executable
    for flag, value in replace.items():
        cmd[cmd.index(flag) + 1] = value
    return cmd


# Runs `python -m MODULE ARGS` and, at exit, writes which of the heavy frameworks the process imported.
WATCH_IMPORTS = (
    "import atexit, runpy, sys; marker = sys.argv.pop(1); module = sys.argv.pop(1); "
    "atexit.register(lambda: open(marker, 'w').write(' '.join(sorted("
    "{name.split('.')[0] for name in sys.modules} & {'tensorflow', 'keras', 'jax'})))); "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def watching_imports(cmd: list[str], marker: Path) -> list[str]:
    """A stage command (`python -m components.X ...`) that also records its heavy imports in `marker`."""
    assert cmd[1] == "-m", cmd
    return [cmd[0], "-c", WATCH_IMPORTS, str(marker), *cmd[2:]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("outage")
    store = root / "server"
    store.mkdir()
    port = free_port()
    ws = make_tiny_workspace(
        root / "ws",
        make_classes(root / "source", {"alpha": 12, "beta": 12}),
        **FAULT_SETTINGS,
        tracking={"retry_attempts": 2, "retry_backoff_s": 0.5},
    )
    env = stage_env(MLFLOW_TRACKING_URI=f"http://ci-user:{SECRET}@127.0.0.1:{port}")
    dvc = str(Path(sys.executable).parent / "dvc")
    facts: dict[str, Any] = {"ws": ws, "store": store, "port": port}

    server = start_mlflow_server(store, port)
    try:
        facts["trained"] = run([dvc, "repro", "finetune"], ws, env)
        assert facts["trained"]["code"] == 0, facts["trained"]["out"][-4000:]
    finally:
        stop(server)

    facts["model_sha"] = sha256(ws / "models" / "finetune" / "model.keras")
    facts["evaluate_down"] = run([dvc, "repro"], ws, env)
    facts["model_sha_after_outage"] = sha256(ws / "models" / "finetune" / "model.keras")
    down = root / "down"
    for stage, out in (("train_head", "head"), ("finetune", "finetune")):
        cmd = stage_cmd(ws, stage, **{"--out-dir": str(down / out), "--report-dir": str(down / f"reports_{out}")})
        facts[f"{stage}_down"] = run(watching_imports(cmd, root / f"{stage}_down.imports"), ws, env)
        facts[f"{stage}_down"]["imports"] = (root / f"{stage}_down.imports").read_text()
    facts["down_dir"] = down
    for key in ("trained", "evaluate_down", "train_head_down", "finetune_down"):
        (root / f"{key}.log").write_text(facts[key]["out"])  # kept with the test's tmp dir, for reading

    server = start_mlflow_server(store, port)
    try:
        facts["recovered"] = run([dvc, "repro"], ws, env)
        (root / "recovered.log").write_text(facts["recovered"]["out"])
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        facts["runs"] = {r.info.run_name: r for r in runs}
        facts["versions"] = client.search_model_versions(f"name = '{MODEL_NAME}'")
    finally:
        stop(server)
    return facts


def test_evaluate_retries_then_names_the_redacted_server_and_keeps_the_model(outage: dict[str, Any]) -> None:
    result, port = outage["evaluate_down"], outage["port"]
    assert result["code"] != 0
    assert (
        f"evaluate: MLflow at http://***@127.0.0.1:{port} failed to reach the tracking server after 2 attempts: "
        f"connection refused: 127.0.0.1:{port}"
    ) in result["out"], result["out"][-3000:]
    assert "rerun this stage (dvc repro evaluate) once MLflow answers, no retraining needed" in result["out"]
    assert "Running stage 'finetune'" not in result["out"]
    assert outage["model_sha_after_outage"] == outage["model_sha"]


def test_training_stages_refuse_to_start_while_the_server_is_down(outage: dict[str, Any]) -> None:
    port = outage["port"]
    for stage in ("train_head", "finetune"):
        result = outage[f"{stage}_down"]
        assert result["code"] == 1, result["out"][-3000:]
        last = result["out"].strip().splitlines()[-1]
        assert last == (
            f"{stage}: error: MLflow at http://***@127.0.0.1:{port} failed to reach the tracking server "
            f"after 2 attempts: connection refused: 127.0.0.1:{port}"
        ), result["out"][-3000:]
        assert "Traceback" not in result["out"] and "Epoch 1/" not in result["out"]  # failed before training
        assert result["imports"] == "", result["imports"]  # and before TensorFlow's ten seconds of start-up
        assert not (outage["down_dir"] / stage).exists()
    checkpoints = outage["ws"] / ".checkpoints" / "finetune"  # a refused finetune leaves no checkpoint folder
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_after_the_server_returns_repro_only_evaluates_and_registers(outage: dict[str, Any]) -> None:
    result = outage["recovered"]
    assert result["code"] == 0, result["out"][-4000:]
    assert "Running stage 'evaluate'" in result["out"]
    for stage in ("ingest", "validate", "augment", "train_head", "finetune"):
        assert f"Running stage '{stage}'" not in result["out"]
    assert [v.version for v in outage["versions"]] == ["1"]
    assert outage["versions"][0].tags["finetune_run_id"] == outage["runs"]["finetune"].info.run_id


def test_the_secret_in_the_tracking_uri_is_stored_and_shown_nowhere(outage: dict[str, Any]) -> None:
    assert {"train_head", "finetune", "evaluate"} <= set(outage["runs"])  # the checks below saw real runs
    for name, run_ in outage["runs"].items():
        assert SECRET not in repr(run_.data.params) and SECRET not in repr(run_.data.tags), name
        assert run_.data.params.get("tracking_server", "http://***@").startswith("http://***@")
    for version in outage["versions"]:
        assert SECRET not in repr(version.tags) and SECRET not in (version.source or "")
    for key in ("trained", "evaluate_down", "train_head_down", "finetune_down", "recovered"):
        assert SECRET not in outage[key]["out"], key
    ws = outage["ws"]
    files = [
        ws / "dvc.lock",
        ws / "metrics.json",
        ws / "params.yaml",
        *(ws / "reports").rglob("*"),
        *(ws / "models").rglob("*.json"),
    ]
    # everything the server stored: its database (params, tags, metrics) and every artifact
    files += [p for p in outage["store"].rglob("*") if p.suffix != ".log"]
    leaks = [str(p) for p in files if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []


@pytest.fixture(scope="module")
def workspace(outage: dict[str, Any]) -> Path:
    """The outage's workspace, trained and evaluated; from here on stages track to its own sqlite store."""
    return outage["ws"]


def test_dvc_repro_killed_during_train_head_reruns_it_cleanly(workspace: Path) -> None:
    ws = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train_head"]["epochs"] = 4  # a changed param: train_head must run again
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs_before = runs_named(ws, "train_head")

    dvc_bin = str(Path(PYTHON).parent / "dvc")
    proc = start([dvc_bin, "repro", "train_head"], ws, ws.parent / "train_head_killed.log")
    kill_when(proc, lambda: runs_named(ws, "train_head") > runs_before)  # tracking started, training under way

    head = ws / "models" / "head"
    assert not head.exists() or {"model.keras", "classes.json", "run.json"} <= {p.name for p in head.iterdir()}
    status = dvc(ws, "status", "train_head").stdout
    assert "changed" in status  # dvc.lock still describes the old run: nothing takes the killed one for done
    rerun = dvc(ws, "repro", "train_head", check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert yaml.safe_load((head / "run.json").read_text()) and (head / "model.keras").stat().st_size > 0
    assert [p.name for p in (ws / "models").iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_finetune_killed_after_an_epoch_resumes_from_the_next_one(workspace: Path) -> None:
    ws = workspace
    dvc(ws, "repro", "train_head")  # whatever the previous test left, a complete head
    finetune_dir = ws / "models" / "finetune"
    previous = sha256(finetune_dir / "model.keras") if (finetune_dir / "model.keras").exists() else None
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["finetune"].update(epochs=6, early_stopping_patience=6)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["finetune"]["cmd"].split()
    cmd[0] = PYTHON

    proc = start(cmd, ws, ws.parent / "finetune_killed.log")

    def epochs_done() -> int:
        logs = list((ws / ".checkpoints" / "finetune").glob("*/epochs.csv"))
        return max((len(log.read_text().strip().splitlines()) - 1 for log in logs), default=0)

    kill_when(proc, lambda: epochs_done() >= 1)
    done_at_kill = epochs_done()
    run_id_at_kill = next((ws / ".checkpoints" / "finetune").glob("*/mlflow_run_id.txt")).read_text().strip()

    if previous is None:
        assert not finetune_dir.exists()
    else:  # the complete 1-epoch model from the fixture, untouched
        assert sha256(finetune_dir / "model.keras") == previous
        assert yaml.safe_load((finetune_dir / "run.json").read_text())["epochs_run"] == 1
    rerun = subprocess.run(cmd, cwd=ws, env=stage_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed = int(re.search(r"resumed at epoch (\d+)", rerun.stdout).group(1))
    # BackupAndRestore saves before the CSV row is written: at most one more epoch than the log shows
    assert done_at_kill + 1 <= resumed <= done_at_kill + 2
    info = yaml.safe_load((finetune_dir / "run.json").read_text())
    assert info["epochs_run"] == 6 and info["run_id"] == run_id_at_kill  # one MLflow run across the kill
    assert not any((ws / ".checkpoints" / "finetune").iterdir())  # checkpoint removed after success
