"""The run summary: what each stage did and produced, read through the stages' typed hand-off files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.core.config import Params
from components.core.contracts import IngestReport, PromotionRecord, TestMetrics, ValidationSummary
from components.core.paths import (
    DRIFT_REPORT,
    INGEST_REPORT,
    METRICS,
    PROMOTION_RECORD,
    QUARANTINE_LIST,
    RUN_SUMMARY_JSON,
    RUN_SUMMARY_MD,
    VALIDATION_SUMMARY,
)
from components.scoring.model_card import markdown_text

REPORTS = {
    "ingest": (INGEST_REPORT, IngestReport),
    "validation": (VALIDATION_SUMMARY, ValidationSummary),
    "metrics": (METRICS, TestMetrics),
    "promotion": (PROMOTION_RECORD, PromotionRecord),
}


def read_report(root: Path, name: str) -> dict[str, Any] | None:
    """A stage's report as a dict, None if that stage has not written it; a malformed one fails loudly."""
    path, contract = REPORTS[name]
    report = contract.read_optional(root / path)
    return report.model_dump(mode="json") if report is not None else None


def collect(root: Path, params: Params, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    reports = {name: read_report(root, name) for name in REPORTS}
    return {
        "stages": outcomes,
        "all_skipped": all(not o["ran"] for o in outcomes),
        "registered_model": params.tracking.registered_model,
        **reports,
    }


def collect_experiment(root: Path, params: Params, outcomes: list[dict[str, Any]], experiment: str) -> dict[str, Any]:
    """Like `collect`, with the reports read from a DVC experiment (the workspace holds the main line's).

    Reports kept in DVC's cache (metrics.json, the promotion record) are read from the experiment;
    a report the experiment never wrote (a stage that did not run there, say) is None.
    """
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(str(root), rev=experiment)
    reports: dict[str, Any] = {}
    for name, (path, contract) in REPORTS.items():
        try:
            text = fs.read_text(path.as_posix())
        except Exception:  # that stage never wrote it in this experiment
            reports[name] = None
            continue
        reports[name] = contract.model_validate(json.loads(text)).model_dump(mode="json")
    return {
        "stages": outcomes,
        "all_skipped": all(not o["ran"] for o in outcomes),
        "registered_model": params.tracking.registered_model,
        **reports,
    }


def run_result(
    reports: dict[str, Any],
    mlflow_run_id: str,
    dvc_remote: dict[str, Any],
    promoted_now: bool,
    *,
    experiment: str | None = None,
    export: dict[str, Any] | None = None,
    drift: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run's result (what `write` keeps): the stages' reports (`collect`) and what the flow did around them."""
    return {
        **reports,
        "mlflow_run_id": mlflow_run_id,
        "export": export,
        "dvc_remote": dvc_remote,
        "experiment": experiment,
        "promoted_now": promoted_now,
        "drift": drift,
    }


PER_CLASS_METRICS = ("precision", "recall", "f1")


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class from metrics.json's flat `<metric>_<class>` keys (components.modeling.metrics.flat_metrics)."""
    by_class: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        metric, _, name = key.partition("_")
        if metric in PER_CLASS_METRICS and name:
            by_class.setdefault(name, {"class": name})[metric] = round(float(value), 4)
    return [by_class[name] for name in sorted(by_class)]


def tracking_links(
    tracking: dict[str, Any], workdir: str, run_id: str | None, promotion: dict[str, Any] | None
) -> list[dict[str, str]]:
    """Link artifacts (create_link_artifact arguments) to this run's MLflow parent run and model version.

    With a tracking server they open its UI; with a local store (SQLite) they are the `runs:/` and
    `models:/` URIs that MLflow's clients take. Never a credential: the server's address without user info.
    """
    from urllib.parse import urlsplit, urlunsplit

    from mlflow import MlflowClient

    from components.core.config import TrackingConfig
    from components.core.tracking_connection import resolve_tracking_uri

    uri = resolve_tracking_uri(TrackingConfig(**tracking), workdir)
    parts = urlsplit(uri)
    ui = None
    if parts.scheme in ("http", "https"):
        host = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
        ui = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    links = []
    if run_id:
        experiment_id = MlflowClient().get_run(run_id).info.experiment_id if ui else None
        links.append(
            {
                "link": f"{ui}/#/experiments/{experiment_id}/runs/{run_id}" if ui else f"runs:/{run_id}",
                "link_text": f"MLflow run {run_id}",
                "key": "mlflow-run",
                "description": "The pipeline's MLflow run; each stage's run is nested under it",
            }
        )
    if promotion and promotion.get("version"):
        name, version = promotion["registered_model"], promotion["version"]
        links.append(
            {
                "link": f"{ui}/#/models/{name}/versions/{version}" if ui else f"models:/{name}/{version}",
                "link_text": f"{name} version {version}" + (" (champion)" if promotion.get("promoted") else ""),
                "key": "mlflow-model-version",
                "description": "The model version this run registered",
            }
        )
    return links


def write(root: Path, result: dict[str, Any]) -> str:
    """Keep the last run's summary in the workspace (JSON for tools, markdown for people)."""
    from components.core.files import atomic_file, write_json

    markdown = to_markdown(result)
    write_json(root / RUN_SUMMARY_JSON, result)
    with atomic_file(root / RUN_SUMMARY_MD) as fh:
        fh.write(markdown)
    return markdown


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def to_markdown(result: dict[str, Any]) -> str:
    lines = ["# Training run summary", ""]
    if result.get("experiment"):
        lines += [
            f"Experiment **{result['experiment']}** (`dvc exp show`; `dvc exp apply {result['experiment']}` "
            "makes its settings the workspace's).",
            "",
        ]
    if result["all_skipped"]:
        lines += ["**Nothing changed** (data, params and code as in the last run): every stage was skipped.", ""]
    lines += ["| stage | ran | seconds |", "|---|---|---|"]
    lines += [
        f"| {o['stage']} | {'yes' if o['ran'] else 'skipped (up to date)'} | {o['seconds']} |" for o in result["stages"]
    ]
    for key, section in SECTIONS:
        if result.get(key):
            lines += section(result[key], result)
    return "\n".join(lines) + "\n"


def _data(ingest: dict[str, Any], result: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Data",
        f"- data version: `{ingest['data_version']}`",
        f"- files: {ingest['files']} ({ingest['images']} images, {ingest['unreadable']} unreadable, "
        f"{ingest['refused_count']} refused)",
        *[
            f"- {markdown_text(split)}: {markdown_text(json.dumps(counts, sort_keys=True))}"
            for split, counts in ingest["counts"].items()
        ],
    ]


def _validation(validation: dict[str, Any], result: dict[str, Any]) -> list[str]:
    counts = validation["counts"]
    return [
        "",
        "## Validation",
        f"- passed: {validation['passed']} (policy: {validation['policy']})",
        f"- kept {counts['valid']} of {counts['files']} files, "
        f"quarantined {counts['quarantined']} ({QUARANTINE_LIST.as_posix()})",
        *[f"- warning: {markdown_text(w)}" for w in validation["warnings"][:5]],
    ]


def _drift(drift: dict[str, Any], result: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Drift",
        f"- {'DRIFT' if drift['drifted'] else 'no drift'} on {drift['sampled_images']} of "
        f"{drift['new_images']} new images; retrain: {drift['retrain']} ({drift['reason']})",
        f"- details: {DRIFT_REPORT.as_posix()}",
    ]


def _metrics(metrics: dict[str, Any], result: dict[str, Any]) -> list[str]:
    return ["", "## Test metrics", "| metric | value |", "|---|---|"] + [
        f"| {markdown_text(k)} | {_fmt(v)} |" for k, v in sorted(metrics.items()) if not isinstance(v, (dict, list))
    ]


def _registry(promotion: dict[str, Any], result: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Registry",
        f"- model: `{result['registered_model']}` version {promotion['version']}",
        f"- champion: {'yes' if promotion['promoted'] else 'no'}",
        *[f"- {markdown_text(reason)}" for reason in promotion["reasons"]],
    ]


def _export(export: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """A line under the registry's: the champion this run exported."""
    return [
        f"- exported: SavedModel and float16 TFLite ({export.get('tflite_bytes', 0) / 1e6:.1f} MB), TFLite agrees "
        f"with Keras on {export.get('top1_agreement', 0):.1%} of {export.get('n_samples', '?')} test images"
    ]


# The summary's sections in order: the result's key, and its lines when the result has it.
SECTIONS: tuple[tuple[str, Callable[[dict[str, Any], dict[str, Any]], list[str]]], ...] = (
    ("ingest", _data),
    ("validation", _validation),
    ("drift", _drift),
    ("metrics", _metrics),
    ("promotion", _registry),
    ("export", _export),
)
