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
