"""The deployment files agree with each other and with the code, and hold no secrets.

Nothing here needs Docker, Kubernetes or a Prefect server: the files are parsed and cross-checked.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows import deployments, notify

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
PREFECT_YAML = REPO / "prefect.yaml"
WORK_POOLS = INFRA / "work-pools"
KUSTOMIZATION = INFRA / "kustomization.yaml"

# `${VAR}`, `${VAR:-default}`, `${VAR:?message}`; `$${VAR}` is compose's escape for a literal `$`.
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|WEBHOOK_URL")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def walk(node: Any):
    """Every mapping in a parsed YAML/JSON tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


# --------------------------------------------------------------------------- docker compose
def test_every_compose_dependency_is_a_service() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_every_compose_variable_is_documented_in_env_example() -> None:
    used = {match.group(1) for match in COMPOSE_VAR.finditer(COMPOSE.read_text())}
    missing = used - env_example().keys()
    assert not missing, f"add to infra/.env.example: {sorted(missing)}"


def test_compose_secrets_are_required_never_defaulted() -> None:
    for match in COMPOSE_VAR.finditer(COMPOSE.read_text()):
        name, operator, _ = match.groups()
        if SECRET_NAME.search(name) and name not in {"TP_NOTIFY_WEBHOOK_URL"}:
            assert operator == ":?", f"{match.group(0)}: a secret must be `${{{name}:?...}}`"


def test_env_example_ships_placeholders_not_secrets() -> None:
    for key, value in env_example().items():
        if SECRET_NAME.search(key):
            assert value in {"", "change-me"} or value.endswith(":change-me"), f"{key} has a real-looking value"


def test_env_file_with_real_secrets_is_git_ignored() -> None:
    result = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert result.returncode == 0, "infra/.env must be ignored by git"


def test_compose_builds_only_from_dockerfiles_that_exist() -> None:
    builds = [s["build"] for s in compose()["services"].values() if "build" in s]
    assert len(builds) >= 3
    for build in builds:
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.is_file(), dockerfile


@pytest.mark.parametrize(
    "dockerfile",
    [
        "Dockerfile.cpu",
        "Dockerfile.gpu",
        "Dockerfile.mlflow",
        "Dockerfile.prefect",
        "Dockerfile.s3",
        "Dockerfile.postgres",
    ],
)
def test_dockerfile_copies_only_files_that_exist_and_reach_the_build(dockerfile: str) -> None:
    text = (INFRA / dockerfile).read_text()
    allowed = [
        line[1:].rstrip("/")
        for line in (INFRA / f"{dockerfile}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            sources = line.split()[1:-1]
            for source in sources:
                if source == "README.md":  # the lead's README, required by pyproject's `readme`
                    continue
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source} does not exist"
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"{dockerfile}: {source} is excluded by {dockerfile}.dockerignore"
                )


def test_images_install_the_matching_tensorflow_extra() -> None:
    assert "infra/requirements/worker-cpu.lock" in (INFRA / "Dockerfile.cpu").read_text()
    assert "infra/requirements/worker-gpu.lock" in (INFRA / "Dockerfile.gpu").read_text()
    cpu = (INFRA / "requirements" / "worker-cpu.lock").read_text()
    gpu = (INFRA / "requirements" / "worker-gpu.lock").read_text()
    assert re.search(r"^tensorflow-cpu==", cpu, re.M) and not re.search(r"^tensorflow==", cpu, re.M)
    assert re.search(r"^tensorflow==", gpu, re.M) and re.search(r"^nvidia-cudnn-cu\d+==", gpu, re.M)


def test_compose_gpu_worker_reserves_an_nvidia_gpu() -> None:
    worker = compose()["services"]["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert worker["command"][worker["command"].index("--pool") + 1] == "gpu"


def test_servers_demand_a_login() -> None:
    services = compose()["services"]
    assert "--app-name=basic-auth" in services["mlflow"]["command"]
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in services["mlflow"]["environment"]
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    for name in ("worker-cpu", "worker-gpu"):
        env = services[name]["environment"]
        assert {"PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env.keys()


def test_published_ports_listen_on_localhost_by_default() -> None:
    assert env_example()["BIND_ADDRESS"] == "127.0.0.1"
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} on all interfaces"


def test_mlflow_serves_artifacts_from_the_object_store() -> None:
    mlflow = compose()["services"]["mlflow"]
    assert "--serve-artifacts" in mlflow["command"]
    # Destination and backend store come from the environment (the URI holds the database password).
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")


def test_worker_env_points_dvc_and_mlflow_at_the_stack() -> None:
    env = compose()["services"]["worker-cpu"]["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert (
        env["DVC_REMOTE_URL"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "${S3_ENDPOINT_URL:-http://minio:9000}"
    )


# --------------------------------------------------------------------------- prefect.yaml
def deployment_specs() -> list[dict[str, Any]]:
    return deployments.load_deployment_specs(PREFECT_YAML)


def flow_functions(path: Path) -> dict[str, tuple[ast.FunctionDef, str]]:
    """Functions decorated with `flow`, with the flow name Prefect will give them."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for decorator in node.decorator_list:
            target = decorator.func if isinstance(decorator, ast.Call) else decorator
            if (getattr(target, "id", None) or getattr(target, "attr", None)) != "flow":
                continue
            name = node.name.replace("_", "-")  # Prefect's default flow name
            if isinstance(decorator, ast.Call):
                for keyword in decorator.keywords:
                    if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                        name = keyword.value.value
            found[node.name] = (node, name)
    return found


def test_expected_deployments_are_declared() -> None:
    labels = {deployments.deployment_label(s) for s in deployment_specs()}
    assert labels == {
        "training/nightly",
        "training/on-demand",
        "stage/gpu",
        "embed-shard/gpu",
        "batch-predict/on-demand",
        "sweep/on-demand",
    }


@pytest.mark.parametrize("spec", deployment_specs(), ids=deployments.deployment_label)
def test_deployment_entrypoint_is_a_flow_taking_its_parameters(spec: dict[str, Any]) -> None:
    import importlib
    import inspect

    file_part, function = spec["entrypoint"].split(":")
    path = REPO / file_part
    assert path.is_file(), f"{spec['entrypoint']}: {file_part} does not exist"
    assert function in flow_functions(path), f"{file_part} has no @flow function {function}"
    flow_object = getattr(importlib.import_module(file_part.removesuffix(".py").replace("/", ".")), function)
    flow_name = flow_object.name  # what Prefect registers, however the decorator spells it
    assert flow_name == spec["flow_name"], f"{function} is flow {flow_name!r}, prefect.yaml says {spec['flow_name']!r}"
    arguments = set(inspect.signature(flow_object.fn).parameters)
    unknown = set(spec.get("parameters") or {}) - arguments
    assert not unknown, f"{function} takes no parameter(s) {sorted(unknown)}"


def test_gpu_deployment_named_for_tp_gpu_deployment_exists() -> None:
    labels = {deployments.deployment_label(s) for s in deployment_specs()}
    texts = [p.read_text() for p in [*INFRA.rglob("*.md"), ENV_EXAMPLE, COMPOSE, PREFECT_YAML] if p.is_file()]
    named = {m for text in texts for m in re.findall(r"TP_(?:GPU|EMBED)_DEPLOYMENT=([\w-]+/[\w-]+)", text)}
    named |= {m for text in texts for m in re.findall(r"Set to ([\w-]+/[\w-]+) to send", text)}
    assert named and named <= labels, f"documented {sorted(named)}, declared {sorted(labels)}"


def test_deployments_use_pools_that_flows_deployments_creates() -> None:
    pools = {plan.name for plan in deployments.plan_work_pools()}
    for spec in deployment_specs():
        assert spec["work_pool"]["name"] in pools, deployments.deployment_label(spec)
    assert {s["work_pool"]["name"] for s in deployment_specs() if s["flow_name"] == "stage"} == {"gpu"}


def test_nightly_training_runs_at_a_fixed_utc_time() -> None:
    nightly = next(s for s in deployment_specs() if deployments.deployment_label(s) == "training/nightly")
    (schedule,) = nightly["schedules"]
    assert schedule["timezone"] == "UTC" and len(schedule["cron"].split()) == 5
    others = [s for s in deployment_specs() if deployments.deployment_label(s) != "training/nightly"]
    assert not any(s.get("schedules") for s in others)


def test_training_runs_queue_up_one_at_a_time() -> None:
    training = [s for s in deployment_specs() if s["flow_name"] == "training"]
    assert len(training) == 2
    for spec in training:
        assert spec["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        # One queue for both: the queue's limit serialises nightly against on-demand runs.
        assert spec["work_pool"]["work_queue_name"] == deployments.TRAINING_QUEUE


def test_served_deployments_keep_schedule_and_concurrency_limit() -> None:
    nightly = next(s for s in deployment_specs() if s["name"] == "nightly")
    kwargs = deployments.to_deployment_kwargs(nightly)
    (schedule,) = kwargs["schedules"]
    assert schedule.cron == nightly["schedules"][0]["cron"] and schedule.timezone == "UTC"
    assert kwargs["concurrency_limit"].limit == 1
    assert kwargs["concurrency_limit"].collision_strategy.value == "ENQUEUE"


def test_serve_mode_builds_the_same_deployments_from_prefect_yaml() -> None:
    served = deployments.build_runner_deployments(PREFECT_YAML)
    assert [(d.flow_name, d.name) for d in served] == [(s["flow_name"], s["name"]) for s in deployment_specs()]
    nightly = served[0]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"] and nightly.concurrency_limit == 1
    only = deployments.build_runner_deployments(PREFECT_YAML, only=["stage/gpu"])
    assert [(d.name, d.parameters) for d in only] == [("gpu", {"stage": "finetune"})]


def test_workers_resolve_the_workspace_from_their_environment() -> None:
    document = yaml.safe_load(PREFECT_YAML.read_text())
    (step,) = document["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $TP_WORKSPACE }}"
    assert compose()["services"]["worker-gpu"]["environment"]["TP_WORKSPACE"] == "/workspace"


# --------------------------------------------------------------------------- work pool templates
def work_pool_template(name: str) -> dict[str, Any]:
    return json.loads((WORK_POOLS / name).read_text())


@pytest.mark.parametrize("name", ["docker-gpu.json", "kubernetes-gpu.json"])
def test_work_pool_template_defines_every_variable_it_uses(name: str) -> None:
    template = work_pool_template(name)
    assert set(template) == {"job_configuration", "variables"}
    used = set(PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    defined = set(template["variables"]["properties"])
    assert used <= defined, f"undefined: {sorted(used - defined)}"


def test_docker_gpu_pool_hands_containers_an_nvidia_gpu() -> None:
    template = work_pool_template("docker-gpu.json")
    (request,) = template["job_configuration"]["container_create_kwargs"]["device_requests"]
    assert request["driver"] == "nvidia" and request["capabilities"] == [["gpu"]]
    assert template["variables"]["properties"]["gpu_count"]["default"] >= 1


def test_kubernetes_gpu_pool_requests_nvidia_gpus() -> None:
    template = work_pool_template("kubernetes-gpu.json")
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert template["variables"]["properties"]["gpu_limit"]["default"] >= 1


def test_gpu_pool_templates_are_what_create_pools_uses() -> None:
    for pool_type, path in deployments.GPU_POOL_TEMPLATES.items():
        (gpu,) = [p for p in deployments.plan_work_pools(gpu_pool_type=pool_type) if p.name == "gpu"]
        assert gpu.type == pool_type and gpu.base_job_template == json.loads(path.read_text())


# --------------------------------------------------------------------------- kubernetes
def test_kustomization_lists_files_that_exist() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    for resource in kustomization["resources"]:
        assert (INFRA / resource).is_file(), resource
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (INFRA / entry.split("=")[-1]).is_file(), entry


def test_k8s_services_select_pods_that_exist() -> None:
    docs = k8s_documents()
    pod_labels = [
        d["spec"]["template"]["metadata"].get("labels", {}) for d in docs if d["kind"] in {"Deployment", "StatefulSet"}
    ]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), service["metadata"]["name"]


def test_k8s_secret_references_name_keys_from_env_example() -> None:
    keys = env_example().keys()
    for node in walk(k8s_documents()):
        ref = node.get("secretKeyRef")
        if ref:
            assert ref["name"] == "tp-secrets" and ref["key"] in keys, ref


def test_k8s_gpu_worker_requests_one_gpu() -> None:
    (worker,) = [d for d in k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "worker-gpu"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][container["args"].index("--pool") + 1] == "gpu"


# --------------------------------------------------------------------------- secrets
LITERAL_SECRET = re.compile(
    r"""(?ix)
    (?:password|passwd|secret(?:_access)?_key|api[_-]?key|token|auth_string)["']?\s*[:=]\s*["']?
    (?!\$\{|\$\(|\{\{|change-me|admin:change-me|["']?\s*$)   # references and placeholders are fine
    [A-Za-z0-9/+_\-:.]{6,}
    | AKIA[0-9A-Z]{16}
    | -----BEGIN\ [A-Z ]*PRIVATE\ KEY-----
    """
)


def literal_secrets(text: str) -> list[str]:
    return [m.group(0) for m in LITERAL_SECRET.finditer(text)]


def test_secret_detector_catches_planted_secrets() -> None:
    assert literal_secrets("POSTGRES_PASSWORD: hunter2-prod")
    assert literal_secrets('"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG"')
    assert literal_secrets("key: AKIAIOSFODNN7EXAMPLE")
    assert not literal_secrets("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}")
    assert not literal_secrets("value: postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres")


def committed_infra_files() -> list[Path]:
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.name != ".env"] + [PREFECT_YAML]
    return [p for p in files if "__pycache__" not in p.parts]


@pytest.mark.parametrize("path", committed_infra_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_literal_secrets_in_committed_infra_files(path: Path) -> None:
    lines = [line for line in path.read_text().splitlines() if "secretKeyRef" not in line]
    assert not literal_secrets("\n".join(lines))


# --------------------------------------------------------------------------- worker start-up
STRONG_WORKER_SECRETS = {"PREFECT_API_AUTH_STRING": "admin:" + "q7" * 12, "MLFLOW_TRACKING_PASSWORD": "z9" * 12}


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_worker_entrypoint_clones_the_project_and_points_dvc_at_the_bucket(tmp_path: Path) -> None:
    source = tmp_path / "repo"
    source.mkdir()
    git("init", "-q", "-b", "main", cwd=source)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "-q"], cwd=source, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=source)

    workspace = tmp_path / "workspace"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        **STRONG_WORKER_SECRETS,
        "TP_WORKSPACE": str(workspace),
        "TP_GIT_REPOSITORY": str(source),
        "TP_GIT_BRANCH": "main",
        "DVC_REMOTE_URL": "s3://dvc/transfer-pipeline",
        "AWS_ENDPOINT_URL": "http://minio:9000",
    }
    result = subprocess.run(
        ["sh", str(INFRA / "worker-entrypoint.sh"), "pwd"], env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(workspace)  # the command runs in the workspace
    local_config = (workspace / ".dvc" / "config.local").read_text()
    assert "s3://dvc/transfer-pipeline" in local_config and "http://minio:9000" in local_config
    git("diff", "--exit-code", cwd=workspace)  # the checkout itself stays clean


def test_worker_entrypoint_refuses_to_start_without_a_project(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TP_GIT_REPOSITORY"}
    env.update(STRONG_WORKER_SECRETS, TP_WORKSPACE=str(tmp_path / "empty"))
    result = subprocess.run(
        ["sh", str(INFRA / "worker-entrypoint.sh"), "true"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "TP_GIT_REPOSITORY" in result.stderr


# --------------------------------------------------------------------------- notifications
class _Recorder(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> str:
    _Recorder.received = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_failed_run_is_posted_to_the_configured_webhook(webhook: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TP_NOTIFY_BLOCK", raising=False)
    monkeypatch.setenv("TP_NOTIFY_WEBHOOK_URL", webhook)
    assert notify.notify("failed", "training run 'nimble-fox' crashed", flow_run_id="42")
    (payload,) = _Recorder.received
    assert payload["event"] == "failed" and payload["flow_run_id"] == "42"
    assert "nimble-fox" in payload["text"]


def test_notify_without_a_channel_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TP_NOTIFY_BLOCK", raising=False)
    monkeypatch.delenv("TP_NOTIFY_WEBHOOK_URL", raising=False)
    assert notify.notify("promoted", "v3 is champion") is False


def test_unreachable_webhook_never_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TP_NOTIFY_BLOCK", raising=False)
    secret_url = "http://127.0.0.1:9/hook?token=s3cr3t"  # port 9 (discard): connection refused
    monkeypatch.setenv("TP_NOTIFY_WEBHOOK_URL", secret_url)
    assert notify.notify("failed", "boom") is False
    assert "s3cr3t" not in caplog.text


def test_cli_lists_deployments_with_pools(capsys: pytest.CaptureFixture[str]) -> None:
    assert deployments.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "training/nightly" in out and "pool=gpu" in out
