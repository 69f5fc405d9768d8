"""MLflow model registry: retries, lineage tags, the challenger -> champion gate, aliases.

Aliases only (`challenger`, `champion`), never the deprecated stages. Every registered version
is kept, promoted or not; the decision and its reasons are tags on the version.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from components.config import Params, PromotionConfig
from components.settings import environment
from components.tracking import RetryPolicy, scrub_credentials, with_retries

CHAMPION = "champion"
CHALLENGER = "challenger"

# --- lineage ------------------------------------------------------------------------------------

def git_commit(workspace: str | Path = ".") -> str:
    """HEAD's commit, '+dirty' when tracked files changed; 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def data_versions(workspace: str | Path = ".") -> dict[str, str]:
    """The data version ingest reported and the `data/raw` md5 DVC locked, where present."""
    workspace = Path(workspace)
    found: dict[str, str] = {}
    ingest_report = workspace / "reports" / "ingest.json"
    if ingest_report.is_file():
        version = json.loads(ingest_report.read_text(encoding="utf-8")).get("data_version")
        if version:
            found["data_version"] = str(version)
    lock = workspace / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []) or []:
                if out.get("path") == "data/raw" and out.get("md5"):
                    found["data_raw_md5"] = str(out["md5"])
    return found


def params_hash(params: Params) -> str:
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lineage_tags(params: Params, run_info: dict[str, Any], head_info: dict[str, Any] | None,
                 workspace: str | Path = ".") -> dict[str, str]:
    """Where a model came from: code, data, settings, backbone, the runs that trained it."""
    tags = {
        "git_commit": git_commit(workspace),
        "params_sha256": params_hash(params),
        "backbone": str(run_info.get("backbone") or params.model.backbone),
        "finetune_run_id": str(run_info.get("run_id") or ""),
        "head_run_id": str(run_info.get("head_run_id") or (head_info or {}).get("run_id") or ""),
        "data_version": "unknown",
        **data_versions(workspace),
    }
    flow_run_id = environment().prefect_flow_run_id
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id
    return {key: scrub_credentials(value) for key, value in tags.items() if value != ""}


# --- promotion ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scores:
    accuracy: float
    min_class_recall: float
    n_test: int


@dataclass
class PromotionDecision:
    promoted: bool
    reasons: list[str]
    challenger: Scores
    champion_version: str | None = None
    champion: Scores | None = None
    champion_problem: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        tags = {
            "promotion.decision": "champion" if self.promoted else "rejected",
            "promotion.reasons": "; ".join(self.reasons),
            "promotion.challenger_accuracy": f"{self.challenger.accuracy:.6f}",
            "promotion.challenger_min_class_recall": f"{self.challenger.min_class_recall:.6f}",
            "promotion.n_test": str(self.challenger.n_test),
            **{f"promotion.threshold.{k}": f"{v:g}" for k, v in self.thresholds.items()},
        }
        if self.champion_version:
            tags["promotion.champion_version"] = self.champion_version
        if self.champion:
            tags["promotion.champion_accuracy"] = f"{self.champion.accuracy:.6f}"
        if self.champion_problem:
            tags["promotion.champion_problem"] = self.champion_problem
        return {k: scrub_credentials(v)[:5000] for k, v in tags.items()}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide_promotion(config: PromotionConfig, challenger: Scores, champion: Scores | None = None,
                     champion_version: str | None = None, champion_problem: str | None = None) -> PromotionDecision:
    """Absolute thresholds first, then the margin over the champion re-scored on the same test split.

    With no champion (or one that could not be re-scored) the thresholds alone decide.
    """
    reasons: list[str] = []
    passed = True

    def check(what: str, value: float, needed: float, against: str) -> None:
        nonlocal passed
        ok = value >= needed - 1e-9  # float noise must not flip a tie
        passed = passed and ok
        reasons.append(f"{'pass' if ok else 'fail'}: {what} {value:.4f} {'>=' if ok else '<'} {against}")

    check("accuracy", challenger.accuracy, config.min_accuracy, f"min_accuracy {config.min_accuracy:g}")
    check("lowest class recall", challenger.min_class_recall, config.min_class_recall,
          f"min_class_recall {config.min_class_recall:g}")
    if champion is not None:
        check("accuracy", challenger.accuracy, champion.accuracy + config.min_improvement,
              f"champion v{champion_version} re-scored {champion.accuracy:.4f} + min_improvement "
              f"{config.min_improvement:g} (same {challenger.n_test} test images)")
    elif champion_version is not None:
        reasons.append(f"note: champion v{champion_version} could not be re-scored ({champion_problem}); "
                       "decided on the thresholds alone")
    else:
        reasons.append("note: no champion yet; decided on the thresholds alone")
    return PromotionDecision(passed, reasons, challenger, champion_version, champion, champion_problem,
                             thresholds={"min_accuracy": config.min_accuracy, "min_class_recall": config.min_class_recall,
                                         "min_improvement": config.min_improvement})


# --- registry calls -------------------------------------------------------------------------------

def alias_version(name: str, alias: str, policy: RetryPolicy = RetryPolicy()) -> str | None:
    """The version number an alias points at, or None (no such model or alias)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        found = with_retries(f"read alias {alias} of {name}", client.get_model_version_by_alias, name, alias, policy=policy)
        return str(found.version)
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
            return None
        raise


def register_version(name: str, model_uri: str, tags: dict[str, str], policy: RetryPolicy = RetryPolicy()) -> str:
    """Register `model_uri` as a new version of `name` (created if needed) and point `challenger` at it."""
    import mlflow
    from mlflow import MlflowClient

    version = with_retries(f"register {name}", mlflow.register_model, model_uri, name, tags=tags, policy=policy).version
    with_retries("set the challenger alias", MlflowClient().set_registered_model_alias, name, CHALLENGER, version, policy=policy)
    return str(version)


def apply_decision(name: str, version: str, decision: PromotionDecision, policy: RetryPolicy = RetryPolicy()) -> None:
    """Record the decision on the version; move `champion` to it only if it passed. Nothing is deleted."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in decision.tags().items():
        with_retries("tag the model version", client.set_model_version_tag, name, version, key, value, policy=policy)
    if decision.promoted:
        with_retries("set the champion alias", client.set_registered_model_alias, name, CHAMPION, version, policy=policy)
