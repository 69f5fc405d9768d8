"""prefect.yaml deploys as written onto a real Prefect server, with the pools flows.deployments creates.

Starts `prefect server start` on a free local port (its own PREFECT_HOME), runs
`python -m flows.deployments --create-pools` and `prefect --no-prompt deploy --all`, then reads
the deployments back. No flow is run here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 180
COMMAND_TIMEOUT_S = 300

pytestmark = pytest.mark.slow

READ_BACK = r"""
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    out = {"deployments": {}, "pools": {}}
    for d in client.read_deployments():
        flow = client.read_flow(d.flow_id)
        out["deployments"][f"{flow.name}/{d.name}"] = {
            "work_pool": d.work_pool_name, "work_queue": d.work_queue_name,
            "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                          for s in d.schedules],
            "concurrency_limit": d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
            "collision_strategy": d.concurrency_options.collision_strategy.value if d.concurrency_options else None,
            "parameters": d.parameters, "pull_steps": d.pull_steps, "entrypoint": d.entrypoint}
    for name in ("cpu", "gpu"):
        pool = client.read_work_pool(name)
        out["pools"][name] = {"type": pool.type, "concurrency_limit": pool.concurrency_limit}
    queue = client.read_work_queue_by_name("training", work_pool_name="cpu")
    out["training_queue_limit"] = queue.concurrency_limit
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def prefect_api(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A throw-away Prefect server; yields the environment its clients need."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "TP_WORKSPACE"):
        env.pop(name, None)
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prefect server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(2)
        yield {**env, "PREFECT_API_URL": api_url}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_prefect_yaml_deploys_the_nightly_schedule_onto_the_created_pools(prefect_api: dict[str, str]) -> None:
    run([sys.executable, "-m", "flows.deployments", "--create-pools"], prefect_api)
    run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], prefect_api)
    state = json.loads(run([sys.executable, "-c", READ_BACK], prefect_api).strip().splitlines()[-1])

    deployed = state["deployments"]
    assert set(deployed) == {
        "training/nightly",
        "training/on-demand",
        "stage/gpu",
        "embed-shard/gpu",
        "batch-predict/on-demand",
        "sweep/on-demand",
    }
    nightly = deployed["training/nightly"]
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert (nightly["work_pool"], nightly["work_queue"]) == ("cpu", "training")
    assert (
        deployed["training/on-demand"]["work_queue"] == "training" and not deployed["training/on-demand"]["schedules"]
    )
    # A sweep shares the training queue: it runs DVC experiments in the same workspace.
    assert (deployed["sweep/on-demand"]["work_pool"], deployed["sweep/on-demand"]["work_queue"]) == ("cpu", "training")
    for label in ("training/nightly", "training/on-demand", "stage/gpu", "sweep/on-demand"):
        assert (deployed[label]["concurrency_limit"], deployed[label]["collision_strategy"]) == (1, "ENQUEUE"), label
    assert deployed["stage/gpu"]["work_pool"] == "gpu" and deployed["stage/gpu"]["parameters"] == {"stage": "finetune"}
    assert deployed["embed-shard/gpu"]["work_pool"] == "gpu"  # the embedding pass's shards, on the GPU workers
    # The workspace is the worker's: the placeholder survives deployment, to be filled in at run time.
    assert deployed["training/nightly"]["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $TP_WORKSPACE }}"}}
    ]

    assert state["pools"] == {
        "cpu": {"type": "process", "concurrency_limit": None},
        "gpu": {"type": "process", "concurrency_limit": 1},
    }
    assert state["training_queue_limit"] == 1
