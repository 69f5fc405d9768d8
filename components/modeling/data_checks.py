"""What train_head learns about its data on the way (issue 13): suspect labels and the drift reference.

Both come from the cached frozen features when there are any: suspect labels are ranked over every split
(quality.label_issues), and the drift reference (modeling.drift) is saved in the model folder. This
module runs the check and writes what it found: the reference and the exclusion list into the model folder,
the suspect-label reports into the report folder and MLflow.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.core import tracking
from components.core.array_rows import StackedRows
from components.core.config import Params
from components.ingestion.images import ImageLimits
from components.modeling import drift
from components.modeling.data import Split
from components.quality import label_issues


@dataclass
class DataChecks:
    """What the cached-features path learns about the data on the way (issue 13)."""

    issues: label_issues.LabelIssues | None = None  # suspect labels (None: action off or no cached features)
    reference: drift.Reference | None = None  # the drift reference saved with the model
    feature_engine: str | None = None  # what computed the features this run (None: cache hit or not cached)
    feature_replicas: int | None = None  # devices that pass ran on at once (None: no pass this run)


def suspect_labels(
    plain: np.ndarray, arrays: dict[str, np.ndarray], train: Split, val: Split, test: Split, params: Params
) -> label_issues.LabelIssues:
    """Suspect labels over train, val and test (in that order, test when its features are cached), from the
    cached un-augmented features (`plain`: the training images' own)."""
    config = params.train_head.label_issues
    started = time.perf_counter()
    parts = [("train", train, plain), ("val", val, arrays["val_x"])]
    if "test_x" in arrays:
        parts.append(("test", test, arrays["test_x"]))
    issues = label_issues.find_label_issues(
        StackedRows([x for _, _, x in parts]),  # the cached memory maps, read in chunks: never concatenated
        np.concatenate([split.labels for _, split, _ in parts]),
        train.classes,
        [path for _, split, _ in parts for path in split.paths],
        config.folds,
        params.project.seed,
        config.max_excluded_fraction if config.action == "exclude" else 0.0,
        [name for name, split, _ in parts for _ in split.paths],
    )
    per_split = ", ".join(f"{n} {s}" for s, n in issues.table["split"].value_counts().items()) or "none"
    print(
        f"label issues: {len(issues.table)} suspect(s) ({per_split}), "
        f"{int(issues.excluded.sum())} training image(s) excluded, {time.perf_counter() - started:.1f} s"
    )
    return issues


def write_data_checks(
    checks: DataChecks,
    params: Params,
    run_info: dict[str, Any],
    out_dir: str | Path,
    report_dir: str | Path,
    client: Any,
    run_id: str,
) -> None:
    """Drift reference and exclusion list into the model folder; suspect-label reports into report_dir and MLflow."""
    if checks.reference is not None:
        meta = drift.reference_meta(run_info)
        dataclasses.replace(checks.reference, meta=meta).save(Path(out_dir) / drift.REFERENCE_FILE)
    # Always written (a DVC out that evaluate reads): header only when the check did not run, which
    # run.json's suspect_label_splits (None) tells apart from a check that found nothing.
    issues = checks.issues or label_issues.LabelIssues(label_issues.empty_table(), np.zeros(0, dtype=bool), 0)
    csv_path, png_path = label_issues.write_reports(
        issues,
        report_dir,
        ImageLimits.from_config(params.validate),
        params.train_head.label_issues.gallery_images,
    )
    if checks.issues is not None:
        label_issues.write_exclusions(checks.issues, out_dir)
        client.log_metric(run_id, "label_issues", len(checks.issues.table))
        for split in checks.issues.checked_splits:
            client.log_metric(run_id, f"label_issues_{split}", int((checks.issues.table["split"] == split).sum()))
        client.log_metric(run_id, "label_issues_excluded", int(checks.issues.excluded.sum()))
        client.log_artifact(run_id, str(csv_path))
        tracking.log_picture(client, run_id, png_path, f"train_head/{label_issues.GALLERY_FILE}")
