"""Least privilege in infra/ (issue 10) and the offline validation CI runs on it (issue 15).

Runs with no Docker daemon or cluster: `kubectl kustomize`, `kubernetes-validate`, Compose v2's `config`
and moto's S3 + IAM server (on 127.0.0.1) are real; planted errors must make the validation fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
STRONG = "Vq3" * 6


def load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


validate_infra = load("validate_infra", INFRA / "scripts" / "validate_infra.py")
setup_store = load("setup_store", INFRA / "s3" / "setup_store.py")


def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def built_manifests() -> list[dict[str, Any]]:
    docs, _ = validate_infra.kustomize_build(INFRA)
    return docs


def pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", validate_infra.pod_spec(d))
        for d in docs
        if validate_infra.pod_spec(d) is not None
    ]


# --------------------------------------------------------------------------- placeholder secrets
def check_secrets(env: dict[str, str], *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(INFRA / "check-secrets.sh"), *names, "--", "echo", "started"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("value", ["change-me", "CHANGE-ME", "changeme", "admin:change-me", "password", "", "short-1"])
def test_placeholder_or_short_secret_is_refused_at_start(value: str) -> None:
    result = check_secrets(
        {"POSTGRES_PASSWORD": value, "PREFECT_AUTH_STRING": f"admin:{STRONG}"},
        "POSTGRES_PASSWORD",
        "PREFECT_AUTH_STRING",
    )
    assert result.returncode == 3 and "started" not in result.stdout
    assert "POSTGRES_PASSWORD" in result.stderr and "PREFECT_AUTH_STRING" not in result.stderr
    if len(value) > 3:
        assert value not in result.stderr  # the value is never printed


def test_generated_secrets_start_the_command() -> None:
    result = check_secrets(
        {"POSTGRES_PASSWORD": STRONG, "PREFECT_AUTH_STRING": f"admin:{STRONG}"},
        "POSTGRES_PASSWORD",
        "PREFECT_AUTH_STRING",
    )
    assert result.returncode == 0 and result.stdout.strip() == "started"


def test_auth_string_is_judged_by_its_password_part() -> None:
    assert check_secrets({"PREFECT_AUTH_STRING": "a-long-user-name:change-me"}, "PREFECT_AUTH_STRING").returncode == 3


def secret_variables_in_compose() -> set[str]:
    text = (INFRA / "docker-compose.yml").read_text()
    return {m for m in re.findall(r"\$\{([A-Z_]*(?:PASSWORD|AUTH_STRING|SECRET)[A-Z_]*):\?", text)}


def test_config_check_guards_every_secret_and_everything_waits_for_it() -> None:
    services = compose()["services"]
    checked = set(services["config-check"]["command"][1:])
    assert secret_variables_in_compose() <= checked, f"not checked: {secret_variables_in_compose() - checked}"

    def depends_on_check(name: str, seen: frozenset[str] = frozenset()) -> bool:
        deps = services[name].get("depends_on", {})
        return "config-check" in deps or any(depends_on_check(d, seen | {name}) for d in deps if d not in seen)

    for name in services:
        if name != "config-check":
            assert depends_on_check(name), f"{name} can start before config-check"
    assert services["config-check"]["restart"] == "no"


def test_servers_check_their_own_secrets_too() -> None:
    services = compose()["services"]
    for name in ("prefect-server", "mlflow", "mlflow-init"):
        command = services[name]["command"]
        assert command[0] == "tp-check-secrets" and "--" in command, name
    worker_entrypoint = (INFRA / "worker-entrypoint.sh").read_text()
    assert "check-secrets" in worker_entrypoint
    for doc in built_manifests():
        for container in validate_infra.containers(doc):
            if container["image"].split("/")[-1].startswith(("transfer-pipeline-mlflow", "transfer-pipeline-prefect")):
                assert container["args"][0] == "tp-check-secrets", f"{doc['metadata']['name']}/{container['name']}"


# --------------------------------------------------------------------------- no password on a command line
def test_detector_finds_a_password_on_a_command_line() -> None:
    found = validate_infra.command_line_secrets
    assert found(["--backend-store-uri=postgresql://u:$(POSTGRES_PASSWORD)@postgres:5432/mlflow"])
    assert found(["--backend-store-uri=postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD:?x}@postgres/mlflow"])
    assert found(['mc alias set store http://minio:9000 "$$MINIO_ROOT_USER" "${MINIO_ROOT_PASSWORD}"'])
    assert found(["postgresql://pipeline:hunter2hunter2@db/mlflow"])
    assert not found(["tp-check-secrets", "POSTGRES_PASSWORD", "--", "mlflow", "server", "--host=0.0.0.0"])


def test_no_password_on_any_command_line() -> None:
    for name, service in compose()["services"].items():
        command = service.get("command") or []
        assert not validate_infra.command_line_secrets(command if isinstance(command, list) else [command]), name
        healthcheck = (service.get("healthcheck") or {}).get("test") or []
        assert not validate_infra.command_line_secrets(healthcheck), name
    for doc in built_manifests():
        for container in validate_infra.containers(doc):
            words = [*(container.get("command") or []), *(container.get("args") or [])]
            assert not validate_infra.command_line_secrets(words), f"{doc['metadata']['name']}/{container['name']}"
    entrypoint = (INFRA / "postgres" / "entrypoint.sh").read_text()
    assert "--pwfile" in entrypoint and not re.search(r"initdb[^\n]*\$POSTGRES_PASSWORD", entrypoint)


# --------------------------------------------------------------------------- object store: one key per role
def test_no_object_store_key_in_env_file_compose_or_k8s_environment() -> None:
    example = (INFRA / ".env.example").read_text()
    assert not re.search(r"^S3_\w*(ACCESS|SECRET)_KEY=", example, re.M)
    for service in compose()["services"].values():
        env = service.get("environment") or {}
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    for doc in built_manifests():
        for container in validate_infra.containers(doc):
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {e["name"] for e in container.get("env") or []}


def test_each_service_mounts_only_its_own_role_key() -> None:
    mounts = {
        name: {str(v).split(":")[0] for v in service.get("volumes") or [] if str(v).startswith("s3-keys-")}
        for name, service in compose()["services"].items()
    }
    assert mounts["store-init"] == {"s3-keys-training", "s3-keys-mlflow", "s3-keys-serving"}
    assert mounts["mlflow"] == {"s3-keys-mlflow"}
    assert mounts["worker-cpu"] == mounts["worker-gpu"] == {"s3-keys-training"}
    assert all(
        not keys for name, keys in mounts.items() if name not in {"store-init", "mlflow", "worker-cpu", "worker-gpu"}
    )
    secrets_by_pod = {}
    for name, spec in pods(built_manifests()):
        secrets_by_pod[name] = {v["secret"]["secretName"] for v in spec.get("volumes") or [] if "secret" in v}
    assert secrets_by_pod["Deployment/mlflow"] == {"tp-s3-mlflow"}
    assert secrets_by_pod["Deployment/worker-cpu"] == secrets_by_pod["Deployment/worker-gpu"] == {"tp-s3-training"}
    assert secrets_by_pod["Job/store-init"] == {"tp-s3-training", "tp-s3-mlflow", "tp-s3-serving"}


def test_role_policies_grant_what_each_role_needs_and_no_more() -> None:
    buckets = {"DVC_BUCKET": "data", "MLFLOW_BUCKET": "models"}

    def grants(role: str) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for statement in setup_store.policy_document(role, buckets)["Statement"]:
            assert statement["Effect"] == "Allow" and "*" not in json.dumps(statement["Action"])
            for resource in statement["Resource"]:
                bucket = resource.split(":::")[1].split("/")[0]
                found.setdefault(bucket, set()).update(statement["Action"])
        return found

    training, mlflow, serving = grants("training"), grants("mlflow"), grants("serving")
    assert "s3:PutObject" in training["data"] and "s3:PutObject" in training["models"]
    assert set(mlflow) == {"models"} and "s3:PutObject" in mlflow["models"]
    assert set(serving) == {"models"} and serving["models"] <= {"s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(auth_after: int | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    if auth_after is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("moto_server did not start")


@pytest.fixture
def moto_store() -> Iterator[str]:
    if not (BIN / "moto_server").exists():
        pytest.skip("moto[server] not installed (pyproject dev extra)")
    proc, url = start_moto(auth_after=5)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def run_setup(monkeypatch: pytest.MonkeyPatch, url: str, out: Path) -> int:
    for key, value in {
        "S3_ENDPOINT_URL": url,
        "S3_ADMIN_API": "iam",
        "S3_BOOTSTRAP_ADMIN": "1",
        "S3_CREDENTIALS_DIR": str(out),
        "DVC_BUCKET": "dvc",
        "MLFLOW_BUCKET": "mlflow",
    }.items():
        monkeypatch.setenv(key, value)
    return setup_store.main()


def role_client(url: str, out: Path, role: str) -> Any:
    return setup_store.s3_client(url, "us-east-1", setup_store.read_credentials(out / role / "credentials"))


def test_the_store_double_authorizes_listing_as_aws_does() -> None:
    """AWS authorizes ListObjects and ListObjectsV2 with the IAM action s3:ListBucket.

    moto 5.2.6 asks for s3:ListObjectsV2 (an API name, no IAM action) and so refuses our correct
    policies; the lock excludes it. This names the cause if a relock brings such a release back.
    """
    import boto3
    from botocore.exceptions import ClientError
    from moto import mock_aws
    from moto.core import set_initial_no_auth_action_count

    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::tp-canary"]}],
    }

    @set_initial_no_auth_action_count(5)  # the five set-up calls below run unauthenticated
    @mock_aws
    def list_with_list_bucket_only() -> dict[str, str]:
        iam, admin = boto3.client("iam", region_name="us-east-1"), boto3.client("s3", region_name="us-east-1")
        admin.create_bucket(Bucket="tp-canary")
        iam.create_user(UserName="lister")
        arn = iam.create_policy(PolicyName="list", PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
        iam.attach_user_policy(UserName="lister", PolicyArn=arn)
        key = iam.create_access_key(UserName="lister")["AccessKey"]
        lister = boto3.client(
            "s3",
            region_name="us-east-1",
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        )
        answers = {}
        for name, call in {"ListObjectsV2": lister.list_objects_v2, "ListObjects": lister.list_objects}.items():
            try:
                call(Bucket="tp-canary")
                answers[name] = "allowed"
            except ClientError as error:
                answers[name] = error.response["Error"]["Code"]
        return answers

    import moto

    assert list_with_list_bucket_only() == {"ListObjectsV2": "allowed", "ListObjects": "allowed"}, (
        f"moto {moto.__version__} does not map S3 listing to s3:ListBucket as AWS does: keep it out of the lock"
    )


def test_store_setup_gives_each_role_its_own_enforced_policy(
    moto_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_setup(monkeypatch, moto_store, tmp_path) == 0
    for role in setup_store.ROLES:
        assert (tmp_path / role / "credentials").stat().st_mode & 0o777 == 0o600
    training, mlflow, serving = (role_client(moto_store, tmp_path, r) for r in ("training", "mlflow", "serving"))
    training.put_object(Bucket="dvc", Key="files/md5/ab/cd", Body=b"data")
    mlflow.put_object(Bucket="mlflow", Key="artifacts/1/model.keras", Body=b"model")
    assert serving.get_object(Bucket="mlflow", Key="artifacts/1/model.keras")["Body"].read() == b"model"
    assert not setup_store.allowed(
        lambda: serving.put_object(Bucket="mlflow", Key="artifacts/1/model.keras", Body=b"x")
    )
    assert not setup_store.allowed(lambda: serving.get_object(Bucket="dvc", Key="files/md5/ab/cd"))
    assert not setup_store.allowed(lambda: mlflow.get_object(Bucket="dvc", Key="files/md5/ab/cd"))
    unsigned = setup_store.s3_client(moto_store, "us-east-1", ("anyone", "anything"))
    assert not setup_store.allowed(lambda: unsigned.list_buckets())
    out = capsys.readouterr()
    for role in setup_store.ROLES:  # no secret is printed
        secret = setup_store.read_credentials(tmp_path / role / "credentials")[1]
        assert secret not in out.out + out.err


def test_store_setup_fails_when_a_policy_is_not_attached(
    moto_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = setup_store.IamAdmin.attached_policies
    monkeypatch.setattr(
        setup_store.IamAdmin,
        "attached_policies",
        lambda self, user: set() if user == "tp-serving" else real(self, user),
    )
    assert run_setup(monkeypatch, moto_store, tmp_path) == 1
    assert not (tmp_path / "serving" / "credentials").exists()  # the serving role gets no key


def test_store_setup_fails_when_a_policy_grants_too_much(
    moto_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = tmp_path / "policies"
    shutil.copytree(INFRA / "s3" / "policies", planted)
    serving = json.loads((planted / "serving.json").read_text())
    serving["Statement"][1]["Action"].append("s3:PutObject")  # a read-only role that can write
    (planted / "serving.json").write_text(json.dumps(serving))
    monkeypatch.setattr(setup_store, "POLICY_DIR", planted)
    assert run_setup(monkeypatch, moto_store, tmp_path / "keys") == 1
    assert not (tmp_path / "keys" / "serving" / "credentials").exists()


def test_store_setup_fails_when_the_store_does_not_check_signatures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (BIN / "moto_server").exists():
        pytest.skip("moto[server] not installed")
    proc, url = start_moto(auth_after=None)  # moto without IAM enforcement accepts any request
    try:
        real = setup_store.bootstrap_admin
        monkeypatch.setattr(
            setup_store, "bootstrap_admin", lambda endpoint, region: real(endpoint, region, max_probes=20)
        )
        assert run_setup(monkeypatch, url, tmp_path) == 1
        assert not any(tmp_path.rglob("credentials"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- Kubernetes
def test_only_the_pool_worker_account_may_create_jobs() -> None:
    docs = built_manifests()
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        rules = roles[binding["roleRef"]["name"]]["rules"]
        if any("jobs" in r["resources"] and "create" in r["verbs"] for r in rules):
            assert {s["name"] for s in binding["subjects"]} == {"tp-pool-worker"}
    for name, spec in pods(docs):
        assert spec.get("serviceAccountName", "default") != "tp-pool-worker", name


def test_flow_run_pods_get_an_account_without_api_access() -> None:
    template = json.loads((INFRA / "work-pools" / "kubernetes-gpu.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    account = template["variables"]["properties"]["service_account_name"]["default"]
    assert pod["serviceAccountName"] == "{{ service_account_name }}" and account == "tp-flow-run"
    assert pod["automountServiceAccountToken"] is False
    bound = {s["name"] for d in built_manifests() if d["kind"] == "RoleBinding" for s in d["subjects"]}
    assert account not in bound
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_every_pod_is_non_root_without_escalation_or_capabilities() -> None:
    checked = 0
    for doc in built_manifests():
        spec = validate_infra.pod_spec(doc)
        if spec is None:
            continue
        for container in validate_infra.containers(doc):
            ctx = container.get("securityContext") or {}
            assert (ctx.get("runAsNonRoot") or spec["securityContext"]["runAsNonRoot"]) is True
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
            checked += 1
    assert checked >= 8


def test_network_policy_denies_by_default_and_blocks_the_metadata_endpoint() -> None:
    policies = {d["metadata"]["name"]: d["spec"] for d in built_manifests() if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    postgres = policies["postgres"]["ingress"][0]["from"]
    assert {tuple(p["podSelector"]["matchLabels"].items()) for p in postgres} == {
        (("app", "prefect-server"),),
        (("app", "mlflow"),),
    }
    for name in ("workers", "flow-run-pods"):
        blocks = [rule["to"][0]["ipBlock"] for rule in policies[name]["egress"] if "ipBlock" in rule["to"][0]]
        assert blocks and all("169.254.0.0/16" in b["except"] for b in blocks)


# --------------------------------------------------------------------------- images
def all_image_references() -> list[tuple[str, str]]:
    refs = []
    for name, service in compose()["services"].items():
        refs.append((f"compose {name}", re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", service["image"])))
    for doc in built_manifests():
        refs += [(f"k8s {doc['metadata']['name']}", c["image"]) for c in validate_infra.containers(doc)]
    for path in sorted(INFRA.glob("Dockerfile.*")):
        refs += [(path.name, m) for m in re.findall(r"^ARG BASE_IMAGE=(\S+)", path.read_text(), re.M)]
    for path in sorted((INFRA / "work-pools").glob("*.json")):
        refs.append((path.name, json.loads(path.read_text())["variables"]["properties"]["image"]["default"]))
    return refs


def test_pinning_rule_rejects_floating_tags() -> None:
    pinned = validate_infra.image_pinned
    assert not pinned("minio/minio:latest") and not pinned("postgres") and not pinned("postgres:16-alpine")
    assert not pinned("registry:5000/app") and not pinned("python:3.11-slim")
    assert pinned("postgres:15.10-bookworm") and pinned("minio/minio:RELEASE.2025-04-22T22-12-26Z")
    assert pinned("app@sha256:" + "a" * 64)


def test_every_image_is_pinned_to_an_exact_version() -> None:
    refs = all_image_references()
    assert len(refs) >= 20
    loose = [(where, image) for where, image in refs if not validate_infra.image_pinned(image)]
    assert not loose


@pytest.mark.parametrize("name", ["cpu", "gpu", "mlflow", "prefect", "s3"])
def test_python_images_install_from_a_hashed_lock_in_a_build_stage_and_run_as_non_root(name: str) -> None:
    text = (INFRA / f"Dockerfile.{name}").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2 and stages[0].startswith("${BASE_IMAGE} AS build"), "multi-stage: build, then runtime"
    build, runtime = stages
    lock = re.search(r"COPY (infra/requirements/[\w-]+\.lock)", build).group(1)
    assert "--require-hashes" in build and "pip uninstall --yes pip" in build
    assert "COPY --from=build /opt/venv /opt/venv" in runtime and "pip install" not in runtime
    assert re.findall(r"^USER (\S+)", runtime, re.M)[-1] == "10001:10001"
    requirements = [line for line in (REPO / lock).read_text().splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    assert requirements and all("==" in line and line.rstrip().endswith("\\") for line in requirements), lock


def test_worker_lock_satisfies_the_project_requirements() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for extra in ("cpu", "gpu"):
        pinned = {
            canonicalize_name(m.group(1)): m.group(2)
            for m in re.finditer(
                r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;\\]+)",
                (INFRA / "requirements" / f"worker-{extra}.lock").read_text(),
                re.M,
            )
        }
        for line in [
            *project["dependencies"],
            *project["optional-dependencies"][extra],
            *project["optional-dependencies"]["s3"],
        ]:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(
                {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11", "extra": extra}
            ):
                continue  # the images are Linux, Python 3.11
            name = canonicalize_name(requirement.name)
            assert name in pinned, f"worker-{extra}.lock lacks {name}: run `make lock`"
            assert requirement.specifier.contains(pinned[name], prereleases=True), (
                f"worker-{extra}.lock pins {name}=={pinned[name]}, pyproject wants {requirement.specifier}: "
                "run `make lock`"
            )


# --------------------------------------------------------------------------- CI's offline validation
def test_validation_passes_on_the_committed_files() -> None:
    errors, facts = validate_infra.validate(INFRA)
    assert errors == []
    assert "documents" in facts["kustomize"]


PLANTS = {
    # (file, old, new): what each planted error breaks
    "schema: unknown field": ("k8s/mlflow.yaml", "readinessProbe:", "readinesProbe:"),
    "schema: wrong type": ("k8s/postgres.yaml", "replicas: 1", "replicas: one"),
    "kustomize: missing resource": ("kustomization.yaml", "k8s/network-policy.yaml", "k8s/no-such-file.yaml"),
    "compose: unknown key": (
        "docker-compose.yml",
        '    restart: unless-stopped\n    command: ["prefect", "worker", "start", "--pool", "cpu"',
        '    restartt: unless-stopped\n    command: ["prefect", "worker", "start", "--pool", "cpu"',
    ),
    "policy: root pod": ("k8s/prefect-server.yaml", "runAsNonRoot: true", "runAsNonRoot: false"),
    "policy: escalation": ("k8s/workers.yaml", "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"),
    "policy: floating tag": ("k8s/minio.yaml", "minio/minio:RELEASE.2025-04-22T22-12-26Z", "minio/minio:latest"),
    "policy: job creator": (
        "k8s/workers.yaml",
        "  - kind: ServiceAccount\n    name: tp-pool-worker",
        "  - kind: ServiceAccount\n    name: tp-worker",
    ),
    "policy: password argument": (
        "k8s/mlflow.yaml",
        "            - --serve-artifacts",
        "            - --serve-artifacts\n            - --backend-store-uri=postgresql://a:$(POSTGRES_PASSWORD)@postgres/m",
    ),
    "policy: no default deny": (
        "k8s/network-policy.yaml",
        "  name: default-deny\nspec:\n  podSelector: {}",
        "  name: default-deny\nspec:\n  podSelector: {matchLabels: {app: nothing}}",
    ),
}


@pytest.mark.parametrize("plant", list(PLANTS), ids=list(PLANTS))
def test_validation_fails_on_a_planted_error(plant: str, tmp_path: Path) -> None:
    infra = tmp_path / "infra"
    shutil.copytree(INFRA, infra, ignore=shutil.ignore_patterns("__pycache__", ".env"))
    path, old, new = PLANTS[plant]
    text = (infra / path).read_text()
    assert text.count(old) >= 1, f"plant {plant!r} no longer applies: update the test"
    (infra / path).write_text(text.replace(old, new, 1))
    errors, _ = validate_infra.validate(infra)
    assert errors, f"{plant}: the validation did not notice"


def test_validation_cli_exits_non_zero_on_a_planted_error(tmp_path: Path) -> None:
    infra = tmp_path / "infra"
    shutil.copytree(INFRA, infra, ignore=shutil.ignore_patterns("__pycache__", ".env"))
    (infra / "k8s" / "namespace.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  nam: x\n")
    result = subprocess.run(
        [sys.executable, str(INFRA / "scripts" / "validate_infra.py"), "--infra", str(infra)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "ERROR" in result.stdout


def test_python_kustomize_fallback_renders_what_kubectl_renders() -> None:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed: nothing to compare the fallback with")

    def by_key(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    kubectl, python = by_key(built_manifests()), by_key(validate_infra.python_kustomize(INFRA))
    assert kubectl.keys() == python.keys()
    for key in kubectl:
        assert [c["image"] for c in validate_infra.containers(kubectl[key])] == [
            c["image"] for c in validate_infra.containers(python[key])
        ], key


# --------------------------------------------------------------------------- loopback e2e database
def test_loopback_e2e_gets_a_private_postgres_cluster_when_one_is_installed() -> None:
    import tempfile

    sys.path.insert(0, str(INFRA / "scripts"))
    loopback = load("loopback_services", INFRA / "scripts" / "loopback_services.py")
    if loopback.postgres_bin() is None:
        pytest.skip("no PostgreSQL server installed: the loopback e2e uses SQLite and says so")
    psycopg2 = pytest.importorskip("psycopg2")
    tmp_path = Path(tempfile.mkdtemp(prefix="tp-pg-test-"))  # as the e2e does: the postgres user must reach it
    (tmp_path / "logs").mkdir()
    services = loopback.Services(tmp_path / "logs")
    try:
        settings, label = loopback.start_postgres(tmp_path, services)
        assert settings["host"] == "127.0.0.1" and "PostgreSQL" in label
        for database in ("prefect", "mlflow"):
            with psycopg2.connect(
                host=settings["host"],
                port=settings["port"],
                user=settings["user"],
                password=settings["password"],
                dbname=database,
            ) as connection:
                assert connection.server_version >= 130000
        with pytest.raises(psycopg2.OperationalError):  # scram-sha-256: a wrong password is refused
            psycopg2.connect(
                host=settings["host"],
                port=settings["port"],
                user=settings["user"],
                password="wrong-password",
                dbname="mlflow",
            )
        assert not (tmp_path / "pg" / "pwfile").exists()  # the initdb password file is gone
    finally:
        services.stop_all()
        shutil.rmtree(tmp_path, ignore_errors=True)
