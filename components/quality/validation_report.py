"""What validate writes and reports: quarantine rows, problems, warnings and the summary (`ValidationSummary`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core.contracts import SPLITS, IngestReport, ValidationSummary
from components.core.paths import VALIDATION_SUMMARY
from components.core.stage_config import ValidateConfig
from components.quality.near_duplicates import QUARANTINE_COLUMNS
from components.quality.validation_suites import Failure

SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# In the report folder:
SUMMARY_FILE = VALIDATION_SUMMARY.name
QUARANTINE_FILE = "quarantine.csv"
DATA_DOCS_DIR = "data_docs"
DATA_DOCS_INDEX = f"{DATA_DOCS_DIR}/index.html"


def quarantine_rows(failures: list[Failure], df: pd.DataFrame) -> pd.DataFrame:
    """One row per failing file: path, label, split, the checks it failed and why (quarantine.csv's columns)."""
    reasons: dict[str, list[tuple[str, str]]] = {}
    for failure in failures:
        for item in failure.items:
            reasons.setdefault(item["path"], []).append((failure.check, item["reason"]))
    rows = [
        {
            "path": p,
            "label": df.loc[p, "label"],
            "split": df.loc[p, "split"],
            "checks": ";".join(c for c, _ in found),
            "reason": "; ".join(r for _, r in found),
        }
        for p, found in sorted(reasons.items())
    ]
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)


def problem_lines(failures: list[Failure]) -> list[str]:
    """A readable line per item of the dataset and class checks that failed."""
    return [
        f"class {item['label']!r}: {item['reason']}" if "label" in item else item["reason"]
        for f in failures
        for item in f.items
    ]


def validation_warnings(df: pd.DataFrame, passed: pd.Series, unhashed: int, refused: int) -> list[str]:
    """What a person should know about the kept files, though it fails nothing."""
    notes = []
    # Masks over single columns, not copies of the kept rows (issue 24: ~10 MB at 37,000 images).
    keep = passed.to_numpy()
    column = {name: df[name].reset_index(drop=True) for name in ("label", "split", "sha256", "mode")}
    twins = np.flatnonzero(keep)[column["sha256"][keep].duplicated(keep=False).to_numpy()]
    same = df.iloc[twins][["path", "sha256"]].groupby("sha256")["path"].apply(list)
    if len(same):
        pairs = "; ".join(" = ".join(paths) for paths in same.tolist()[:10])
        notes.append(f"{len(same)} group(s) of byte-identical files under one label and split (kept): {pairs}")
    kept_labels = set(column["label"][keep].unique())
    for split in SPLITS:
        in_split = keep & (column["split"] == split).to_numpy(dtype=bool)
        if not in_split.any():
            notes.append(f"split {split!r} has no usable images")
            continue
        absent = sorted(kept_labels - set(column["label"][in_split].unique()))
        if absent:
            notes.append(f"split {split!r} has no usable images of class(es) {absent}")
    deep = keep & column["mode"].isin(SIXTEEN_BIT_MODES).to_numpy()
    if deep.any():
        notes.append(
            f"{int(deep.sum())} image(s) with 32/16-bit modes {sorted(set(column['mode'][deep]))}: kept, and scaled "
            "to 8 bits when loaded (components.modeling.data.load_rgb)"
        )
    if unhashed:
        notes.append(
            f"{unhashed} row(s) outside the ingested image folder were not checked for "
            "near-duplicates (validate reads images only under the ingest report's raw_dir)"
        )
    if refused:
        notes.append(
            f"ingest refused {refused} entr{'y' if refused == 1 else 'ies'} "
            "the source offered (links out of the source, special files, rows outside the "
            "table's root, bad labels): listed with reasons in the ingest report's `refused`"
        )
    return notes


def file_counts(df: pd.DataFrame, passed: pd.Series, table: pd.DataFrame, bad: dict[str, int]) -> dict[str, Any]:
    """The summary's counts: files kept and left out, bad files (`mark_bad_files`), per class and per split."""
    kept = df.loc[passed.to_numpy(), ["label", "split"]]
    return {
        "files": len(df),
        "valid": int(passed.sum()),
        "quarantined": int((~passed).sum()),
        "hidden_files": int(df["hidden_file"].astype(bool).sum()),
        "bad_files": bad["bad"],
        "bad_fraction": round(bad["bad"] / bad["images"], 6) if bad["images"] else 0.0,
        "per_class": {label: int(n) for label, n in table["images"].items()},
        "per_split": {
            s: {lab: int(n) for lab, n in kept[kept["split"] == s].groupby("label").size().items()} for s in SPLITS
        },
    }


def validation_summary(
    config: ValidateConfig,
    classes: list[str] | None,
    manifest_path: Path,
    info: IngestReport,
    *,
    counts: dict[str, Any],
    versions: dict[str, str],
    problems: list[str],
    warnings: list[str],
    failures: list[Failure],
    near_duplicates: dict[str, Any],
) -> ValidationSummary:
    """summary.json: the outcome, the counts, every failed check with its items, the settings and the ingest facts."""
    ingest = {
        "source": info.source,
        "layout": info.layout,
        "notes": info.notes,
        "class_folders": info.class_folders,
        "refused_count": info.refused_count,
    }
    return ValidationSummary.model_validate(
        {
            "passed": not problems,
            "policy": config.policy,
            "manifest": manifest_path.as_posix(),
            **versions,
            "counts": counts,
            "problems": problems,
            "warnings": warnings,
            "failures": [
                {
                    "check": f.check,
                    "scope": f.scope,
                    "expectation": f.expectation,
                    "quarantinable": f.scope == "file",
                    "count": len(f.items),
                    "items": f.items,
                }
                for f in failures
            ],
            "settings": {**config.model_dump(), "classes": classes},
            "ingest": ingest,
            "data_docs": DATA_DOCS_INDEX,
            "near_duplicates": near_duplicates,
        }
    )
