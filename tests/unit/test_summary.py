"""The run summary (reports/run_summary.md and the Prefect artifact) shows names from the source as text."""

from __future__ import annotations

import re

from flows.summary import to_markdown


def test_labels_in_the_run_summary_cannot_forge_rows_or_inject_html():
    label = "x | 99 |\n<img src=x onerror=alert(1)>"
    result = {
        "stages": [{"stage": "ingest", "ran": True, "seconds": 1.0}],
        "all_skipped": False,
        "ingest": {
            "data_version": "v",
            "files": 2,
            "images": 2,
            "unreadable": 0,
            "refused_count": 0,
            "counts": {"train": {label: 2}},
        },
        "validation": {
            "passed": True,
            "policy": "fail",
            "counts": {"valid": 2, "files": 2, "quarantined": 0},
            "warnings": [f"class {label} has few images"],
        },
        "metrics": {f"recall/{label}": 0.5},
        "promotion": {"version": "1", "promoted": False, "reasons": [f"recall of {label} fell"]},
        "registered_model": "image-classifier",
    }
    text = to_markdown(result)
    assert "<img" not in text and "&lt;img" in text
    metric_rows = [line for line in text.splitlines() if line.startswith("| recall/")]
    assert len(metric_rows) == 1 and len(re.findall(r"(?<!\\)\|", metric_rows[0])) == 3  # two cells, no more


def test_sections_follow_what_the_run_did_and_name_the_hand_off_files():
    from components.core.paths import DRIFT_REPORT, QUARANTINE_LIST

    result = {
        "stages": [{"stage": "validate", "ran": True, "seconds": 1.0}],
        "all_skipped": False,
        "validation": {
            "passed": True,
            "policy": "quarantine",
            "counts": {"valid": 2, "files": 3, "quarantined": 1},
            "warnings": [],
        },
        "drift": {"drifted": True, "sampled_images": 5, "new_images": 9, "retrain": False, "reason": "shifted"},
        "metrics": {"accuracy": 0.9},
        "promotion": {"version": "3", "promoted": True, "reasons": ["better"]},
        "export": {"tflite_bytes": 2_000_000, "top1_agreement": 1.0, "n_samples": 10},
        "registered_model": "image-classifier",
    }
    lines = to_markdown(result).splitlines()
    assert [line for line in lines if line.startswith("## ")] == [
        "## Validation",
        "## Drift",
        "## Test metrics",
        "## Registry",
    ]
    assert f"quarantined 1 ({QUARANTINE_LIST.as_posix()})" in lines[lines.index("## Validation") + 2]
    assert f"- details: {DRIFT_REPORT.as_posix()}" in lines
    assert lines[-1].startswith("- exported: SavedModel and float16 TFLite (2.0 MB)")  # under the registry's lines
    nothing = to_markdown({"stages": [], "all_skipped": True, "registered_model": "image-classifier"})
    assert "## " not in nothing and "**Nothing changed**" in nothing
