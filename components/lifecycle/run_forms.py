"""Deployment run forms: every parameter of a deployment run is checked against the trusted settings.

Whoever can start a deployment run chooses its parameters (the Prefect run form, `run_deployment`,
a schedule's parameters), and that input is not trusted (docs/security.md). The rules come from the
`deployments:` section of the worker's own params.yaml (`DeploymentsConfig`), never from the form:

- a form runs in the worker's workspace with its params.yaml: `workdir` must be `.` and `params_path`
  `params.yaml`;
- inputs (batch prediction's `inputs`, the training `source`) lie under `deployments.input_roots`;
- batch prediction writes only inside `deployments.output_dir`;
- models are `models:/<name>@<alias>` or `models:/<name>/<version>` of `deployments.model_names`;
- overrides name only `deployments.override_keys`, and never a limit (`config.RUN_FORM_FORBIDDEN`);
- a GPU stage's `git_rev` is a full commit id on a `deployments.git_refs` branch, and the params.yaml it
  brings differs from that commit's only in keys a form may override.

Each check raises `RunFormRefused` (a `ParamsError`: not retried, exit 2) naming the parameter, the
value the form gave and the rule, before anything runs. CLI runs are trusted and skip these checks:
the deployment entry points (`*_deployment` flows in flows/, named by prefect.yaml) call them.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from components.core import runtime
from components.core.config import (
    RUN_FORM_FORBIDDEN,
    DeploymentsConfig,
    Params,
    ParamsError,
    covers,
    load_params,
    parse_params,
)
from components.core.credentials import credential_problem

WORKSPACE_PARAMS = "params.yaml"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[0-9]+))$")
FULL_COMMIT = re.compile(r"^[0-9a-f]{40}$")
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$")
MAX_BATCH_SIZE = 1024


class RunFormRefused(ParamsError):
    """A deployment run's parameter is outside what the trusted settings allow."""


def refuse(parameter: str, value: Any, rule: str) -> RunFormRefused:
    return RunFormRefused(f"run form: {parameter} = {value!r} refused: {rule}")


def workspace(workdir: str, params_path: str) -> tuple[Path, Params]:
    """The worker's workspace (the current directory) and its trusted settings; other choices are refused."""
    if workdir not in (".", "./"):
        raise refuse("workdir", workdir, "a deployment runs in its worker's workspace; only '.' is accepted")
    if params_path != WORKSPACE_PARAMS:
        raise refuse("params_path", params_path, f"the rules are the workspace's own; only {WORKSPACE_PARAMS!r}")
    root = Path.cwd().resolve()
    return root, load_params(root / WORKSPACE_PARAMS)


# --- overrides ----------------------------------------------------------------------------------------


def override_problem(key: str, rules: DeploymentsConfig) -> str | None:
    """Why a run form may not set `key`, or None."""
    forbidden = next((f for f in RUN_FORM_FORBIDDEN if covers(f, key) or covers(key, f)), None)
    if forbidden is not None:
        return f"{forbidden} is a limit or trust setting and never comes from a run form"
    if not any(covers(allowed, key) for allowed in rules.override_keys):
        return "not in deployments.override_keys of the workspace's params.yaml"
    return None


def check_overrides(changes: list[str], rules: DeploymentsConfig) -> None:
    """`section.key=value` overrides: every key allow-listed, none a limit (all problems in one message)."""
    problems = []
    for text in changes:
        key = text.partition("=")[0].strip()
        why = override_problem(key, rules)
        if why:
            problems.append(f"{key}: {why}")
    if problems:
        raise RunFormRefused("run form: overrides refused:\n  - " + "\n  - ".join(problems))


# --- paths and URIs -----------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _real(path: Path, root: Path) -> Path:
    """`path` (relative ones against the workspace `root`) with every link resolved."""
    return Path(os.path.realpath(path if path.is_absolute() else root / path))


def _url_parts(location: str) -> tuple[str, str, list[str]] | None:
    """(scheme, host, path segments) of a URL, None when its path climbs (`..`) or it holds a credential."""
    parts = urlsplit(location)
    segments = [unquote(s) for s in parts.path.split("/") if s not in ("", ".")]
    if ".." in segments or credential_problem(location) or parts.query or parts.fragment:
        return None
    return parts.scheme.lower(), parts.netloc.lower(), segments


def _under_url_root(location: str, roots: list[str]) -> bool:
    given = _url_parts(location)
    if given is None:
        return False
    for root in roots:
        allowed = _url_parts(root) if "://" in root else None
        if allowed and given[:2] == allowed[:2] and given[2][: len(allowed[2])] == allowed[2]:
            return True
    return False


def check_input(parameter: str, location: str, root: Path, rules: DeploymentsConfig) -> str:
    """A folder, file or URL a run form names: it must lie under one of `deployments.input_roots`."""
    if not rules.input_roots:
        raise refuse(parameter, location, "deployments.input_roots is empty: a run form may name no input")
    if "://" in location:
        if _under_url_root(location, rules.input_roots):
            return location
    else:
        real = _real(Path(location), root)
        local_roots = [_real(Path(r), root) for r in rules.input_roots if "://" not in r]
        if any(_inside(real, allowed) for allowed in local_roots):
            return str(real)
    raise refuse(parameter, location, "not under deployments.input_roots (links are followed before checking)")


def check_output(out_csv: str, root: Path, rules: DeploymentsConfig) -> Path:
    """Batch prediction's CSV: a file inside `deployments.output_dir` (relative names land there)."""
    out_dir = _real(Path(rules.output_dir), root)
    real = _real(Path(out_csv) if os.path.isabs(out_csv) else out_dir / out_csv, root)
    printable = all(ch.isprintable() for ch in out_csv)  # a newline or escape in a name reaches logs and listings
    if not printable or real.suffix.lower() != ".csv" or out_dir not in real.parents:
        raise refuse("out_csv", out_csv, "must be a .csv file inside deployments.output_dir")
    return real


def check_model_uri(model_uri: str | None, params: Params) -> str:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` of an allowed name (default: the champion)."""
    names = params.deployments.model_names or [params.tracking.registered_model]
    uri = model_uri or f"models:/{params.tracking.registered_model}@champion"
    match = MODEL_URI.match(uri)
    if match is None:
        raise refuse("model_uri", model_uri, "only models:/<name>@<alias> or models:/<name>/<version>")
    if match["name"] not in names:
        raise refuse("model_uri", model_uri, f"model {match['name']!r} is not in deployments.model_names")
    return uri


def check_batch_size(batch_size: int) -> int:
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise refuse("batch_size", batch_size, f"must be between 1 and {MAX_BATCH_SIZE}")
    return batch_size


def check_experiment_name(parameter: str, name: str | None) -> None:
    if name is not None and not EXPERIMENT_NAME.match(name):
        raise refuse(parameter, name, "1-80 letters, digits, '_' or '-', starting with a letter or digit")


# --- the forms ----------------------------------------------------------------------------------------


def check_batch_predict_form(
    inputs: str, out_csv: str, model_uri: str | None, params_path: str, batch_size: int
) -> dict[str, Any]:
    """The batch prediction form, confined: the values to run with (absolute input and output paths)."""
    root, params = workspace(".", params_path)
    rules = params.deployments
    return {
        "inputs": check_input("inputs", inputs, root, rules),
        "out_csv": str(check_output(out_csv, root, rules)),
        "model_uri": check_model_uri(model_uri, params),
        "batch_size": check_batch_size(batch_size),
    }


def check_training_form(
    params_path: str, workdir: str, changes: list[str], source: str | None, experiment: str | None
) -> None:
    """The training form: the workspace's own settings, allow-listed overrides, a source under the input roots."""
    root, params = workspace(workdir, params_path)
    check_overrides(changes, params.deployments)
    if source is not None:
        check_input("source", source, root, params.deployments)
    check_experiment_name("experiment", experiment)


def check_sweep_form(
    changes: list[str], name: str, jobs: int, budget_minutes: float, workdir: str, params_path: str
) -> None:
    """The sweep form: every point's keys allow-listed; a plain name; bounded jobs and budget."""
    _, params = workspace(workdir, params_path)
    check_overrides(changes, params.deployments)
    check_experiment_name("name", name)
    if not 1 <= jobs <= runtime.available_cores():
        raise refuse("jobs", jobs, f"between 1 and this worker's {runtime.available_cores()} cores")
    if not 0 < budget_minutes <= 24 * 60:
        raise refuse("budget_minutes", budget_minutes, "more than 0 and at most 1440 (a day)")


def check_stage_form(
    stage: str, stages: tuple[str, ...], git_rev: str | None, dvc_lock: str | None, workdir: str
) -> DeploymentsConfig:
    """A GPU stage run's form, before anything is fetched: its stage, revision syntax and dvc.lock."""
    _, params = workspace(workdir, WORKSPACE_PARAMS)
    if stage not in stages:
        raise refuse("stage", stage, f"stages: {', '.join(stages)}")
    if git_rev is not None and not FULL_COMMIT.match(git_rev):
        raise refuse("git_rev", git_rev, "a full 40-character commit id")
    if dvc_lock:
        lock = _yaml_mapping("dvc_lock", dvc_lock)
        unknown = sorted(set(lock.get("stages") or {}) - set(stages))
        if unknown:
            raise refuse("dvc_lock", f"stages {unknown}", "dvc.lock may only hold the pipeline's stages")
    return params.deployments


def check_git_rev(root: Path, git_rev: str, rules: DeploymentsConfig) -> None:
    """After `git fetch`: the commit must be on a remote branch that `deployments.git_refs` names."""
    found = subprocess.run(
        ["git", "branch", "--remotes", "--contains", git_rev, "--format=%(refname:short)"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    branches = found.stdout.split() if found.returncode == 0 else []
    if not any(fnmatch.fnmatchcase(b, pattern) for b in branches for pattern in rules.git_refs):
        raise refuse("git_rev", git_rev, "not a commit on a branch that deployments.git_refs allows")


def check_received_params(params_yaml: str, baseline: str, root: Path, rules: DeploymentsConfig) -> Params:
    """The params.yaml a stage run brings: valid, and unlike `baseline` (the trusted one) only where a form may be."""
    received = _yaml_mapping("params_yaml", params_yaml)
    settings = parse_params(received, source="params_yaml")
    trusted = _leaves(_yaml_mapping("the workspace's params.yaml", baseline))
    given = _leaves(received)
    problems = []
    for key in sorted(k for k in set(trusted) | set(given) if trusted.get(k) != given.get(k)):
        if key == "ingest.source":
            check_input("params_yaml: ingest.source", str(given.get(key)), root, rules)
            continue
        why = override_problem(key, rules)
        if why:
            problems.append(f"{key}: {why}")
    if problems:
        raise RunFormRefused(
            "run form: params_yaml differs from the workspace's where it may not:\n  - " + "\n  - ".join(problems)
        )
    return settings


def _yaml_mapping(parameter: str, text: str) -> dict[str, Any]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        raise refuse(parameter, "(text)", "not valid YAML") from None
    if not isinstance(document, dict):
        raise refuse(parameter, "(text)", "must be a YAML mapping")
    return document


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'section.key': value} of every non-mapping value (lists are values)."""
    if isinstance(node, dict) and (node or not prefix):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}
