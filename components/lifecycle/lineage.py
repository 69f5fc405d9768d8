"""Where a registered model came from: the code commit, the data versions, the settings, the runs that trained it.

Evaluate tags the registered version (and writes promotion.json) with these; the data versions come from
the hand-off files (ingest report, validation summary, the model folder's run.json), never from DVC's lock file.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from components.core.config import Params
from components.core.contracts import IngestReport, ModelRunInfo, ValidationSummary
from components.core.credentials import scrub_credentials
from components.core.settings import environment


def git_commit(workspace: str | Path = ".") -> str:
    """HEAD's commit, '+dirty' when tracked files changed; 'unknown' outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=workspace, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def data_versions(
    ingest: IngestReport | None, validation: ValidationSummary | None, info: ModelRunInfo | None
) -> dict[str, str]:
    """The data versions the hand-off files declare: ingested, validated, and the one the model trained on."""
    found = {
        "data_version": ingest.data_version if ingest else (validation.data_version if validation else ""),
        "validated_version": validation.validated_version if validation else "",
        "model_data_version": info.data_version if info else "",
    }
    return {k: v for k, v in found.items() if v}


def params_hash(params: Params) -> str:
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lineage_tags(
    params: Params,
    info: ModelRunInfo,
    head_info: ModelRunInfo | None,
    versions: dict[str, str],
    workspace: str | Path = ".",
) -> dict[str, str]:
    """Where a model came from: code, data, settings, backbone, the runs that trained it."""
    tags = {
        "git_commit": git_commit(workspace),
        "params_sha256": params_hash(params),
        "backbone": info.backbone,  # from run.json: evaluate does not depend on params.model
        "finetune_run_id": info.run_id,
        "head_run_id": info.head_run_id or (head_info.run_id if head_info else ""),
        "data_version": "unknown",
        **versions,
    }
    flow_run_id = environment().prefect_flow_run_id
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id
    return {key: scrub_credentials(value) for key, value in tags.items() if value != ""}
