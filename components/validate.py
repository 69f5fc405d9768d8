"""Validate: a Great Expectations suite over the ingest manifest; bad files are quarantined or fail the run.

Three suites (components/quality/validation_checks.py), built in code from `params.yaml` (section `validate`,
plus `ingest.classes`):
  files    - one row per file: readable, not hidden, allowed format, size and pixel limits, colour mode
             convertible to RGB, no byte-identical copy under another label (label conflict) or in
             another split (leak);
  dataset  - the manifest is not empty and (policy quarantine) at most `max_bad_fraction` is bad;
  classes  - one row per class: enough images, bounded imbalance, no empty class folder, and the
             expected label set when `ingest.classes` is given.
Then, on the files that passed, near-duplicates (components/quality/near_duplicates.py, setting
`validate.near_duplicates`; perceptual hashes, and embeddings of the `model:` backbone computed here by
components/modeling/embeddings.py, cached per image, whose closer pairs below min_cosine are verified by
keypoint matching): groups under 2+ labels are quarantined, groups across
splits are moved to one split (or reported, or fail the run), before the class checks count images.
Policy `quarantine` drops failing files (listed in quarantine.csv) and fails only when a check that
cannot be fixed by dropping files fails; policy `fail` fails on any problem. Outputs: the rows that
passed with their (possibly moved) splits (`data/validated.csv`, manifest columns),
`reports/validation/summary.json`, `quarantine.csv`, `near_duplicates.png` and Great Expectations
Data Docs under `reports/validation/data_docs/`. Each suite runs as a GX Checkpoint whose actions
(`validation_suites.checkpoint_actions`: UpdateDataDocsAction, and any Slack or e-mail action added
there) write the Data Docs. The CLI exits 2 when validation fails (the data's fault: the flow does
not retry it).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from components.core import errors, files, runtime
from components.core.config import ModelConfig, Params, ParamsError, load_params
from components.core.contracts import write_manifest
from components.core.paths import EMBEDDING_CACHE, ONNX_CACHE, ValidatePaths
from components.core.settings import workspace_root
from components.core.stage_config import ValidateConfig
from components.ingestion.images import ImageLimits
from components.quality import near_duplicates
from components.quality.validation_checks import class_checks, dataset_checks, file_checks
from components.quality.validation_inputs import ValidateInputError, data_version, image_root, read_inputs, within
from components.quality.validation_report import (
    DATA_DOCS_DIR,
    DATA_DOCS_INDEX,
    QUARANTINE_FILE,
    SUMMARY_FILE,
    file_counts,
    problem_lines,
    quarantine_rows,
    validation_summary,
    validation_warnings,
)
from components.quality.validation_suites import Suites
from components.quality.validation_tables import class_table, derive_columns, mark_bad_files

MAX_LISTED = 50  # quarantined files echoed to the terminal; all are in quarantine.csv
NEAR_DUPLICATE_CACHE = "data/cache/near_duplicates.npz"  # under the workspace root: shared by dvc exp runs
NEAR_DUPLICATE_PICTURE = "near_duplicates.png"  # in the report folder
NEAR_DUPLICATE_COLUMNS = ["path", "label", "split", "sha256"]  # what near_duplicates.check and its embedder read
VERSION = ["path", "label", "split", "sha256"]  # the columns a data version is computed from: copied alone (issue 24)


@dataclass(frozen=True)
class ValidationResult:
    """What run_validate found and where it wrote it (the CLI prints it; summary.json holds the details)."""

    passed: bool
    policy: str
    files: int
    valid: int
    quarantined: int
    problems: list[str]  # readable "subject: reason" lines, the ones that failed the run
    quarantined_files: list[str]  # "path: reason" for every file left out
    warnings: list[str]
    data_version: str
    validated_version: str
    summary_path: Path
    quarantine_path: Path
    data_docs: Path
    out_manifest: Path | None  # None when the run failed and nothing was written
    near_duplicates: dict[str, Any] = field(default_factory=dict)  # NearDuplicateReport.counts plus policy


def run_validate(params: Params, paths: ValidatePaths) -> ValidationResult:
    """Check every file and class; write the passing rows, the quarantine list, a summary and Data Docs."""
    config, classes = params.validate, params.ingest.classes
    frame, info = read_inputs(paths.manifest, paths.ingest_report)
    df = derive_columns(frame)
    with files.atomic_dir(paths.report_dir) as tmp:
        suites = Suites(tmp / DATA_DOCS_DIR)
        file_failures = suites.failures("files", df, file_checks(config), "path")
        quarantine = quarantine_rows(file_failures, df)
        passed = ~df["path"].isin(quarantine["path"])
        moved, nd, unhashed = _near_duplicates(
            config, params.model, frame, passed, image_root(info, paths.manifest), tmp
        )
        df["split"] = moved["split"].to_numpy()  # moved splits, for the per-split counts and warnings
        quarantine = pd.concat([quarantine, nd.quarantine], ignore_index=True) if len(nd.quarantine) else quarantine
        passed = ~df["path"].isin(quarantine["path"])
        bad = mark_bad_files(df, passed)
        set_failures = suites.failures("dataset", df, dataset_checks(config, bad), "path")
        table = class_table(df, passed, classes, info.class_folders)
        set_failures += suites.failures("classes", table, class_checks(config, classes, table), "label")
        problems = problem_lines(set_failures) + nd.problems
        if config.policy == "fail":
            problems += [f"{r.path}: {r.reason}" for r in quarantine.itertuples()]
        ok = not problems
        versions = {
            "data_version": info.data_version or data_version(frame, info.raw_dir),
            "validated_version": data_version(moved.loc[passed.to_numpy(), VERSION], info.raw_dir),
        }
        warnings = validation_warnings(df, passed, unhashed, info.refused_count)
        files.write_csv(quarantine, tmp / QUARANTINE_FILE)  # names from the source: no cell starts a formula
        validation_summary(
            config,
            classes,
            paths.manifest,
            info,
            counts=file_counts(df, passed, table, bad),
            versions=versions,
            problems=problems,
            warnings=warnings,
            failures=file_failures + set_failures,
            near_duplicates={**nd.to_dict(), "picture": NEAR_DUPLICATE_PICTURE if nd.policy != "off" else None},
        ).write(tmp / SUMMARY_FILE)
    if ok:
        write_manifest(moved[passed.to_numpy()], paths.out_manifest)
    return ValidationResult(
        passed=ok,
        policy=config.policy,
        files=len(df),
        valid=int(passed.sum()),
        quarantined=len(quarantine),
        problems=problems,
        quarantined_files=[f"{r.path}: {r.reason}" for r in quarantine.itertuples()],
        warnings=warnings,
        data_version=versions["data_version"],
        validated_version=versions["validated_version"],
        summary_path=paths.report_dir / SUMMARY_FILE,
        quarantine_path=paths.report_dir / QUARANTINE_FILE,
        data_docs=paths.report_dir / DATA_DOCS_INDEX,
        out_manifest=paths.out_manifest if ok else None,
        near_duplicates={"policy": nd.policy, **nd.counts},
    )


def _near_duplicates(
    config: ValidateConfig, model: ModelConfig, frame: pd.DataFrame, passed: pd.Series, root: Path, report_tmp: Path
) -> tuple[pd.DataFrame, near_duplicates.NearDuplicateReport, int]:
    """(frame with moved splits, the report, rows not hashed because they lie outside `root`).

    Only files that passed the file checks are hashed, so a conflict or leak is judged among usable images.
    """
    if config.near_duplicates.policy == "off":
        return frame, near_duplicates.NearDuplicateReport("off"), 0
    inside = frame["path"].map(lambda p: within(p, root)).to_numpy(dtype=bool)
    candidates = passed.to_numpy() & inside
    limits = ImageLimits.from_config(config)
    _, report = near_duplicates.check(
        frame.loc[candidates, NEAR_DUPLICATE_COLUMNS],  # one copy, of the columns the check reads (issue 24)
        config.near_duplicates,
        limits,
        workspace_root() / NEAR_DUPLICATE_CACHE,
        report_tmp / NEAR_DUPLICATE_PICTURE,
        embed=lambda rows: _embeddings(rows, model, limits),
    )
    # assign: a new frame sharing the other columns (copy-on-write), not a deep copy of every column
    out = frame.assign(split=_moved_splits(frame, report.moved))
    return out, report, int((passed.to_numpy() & ~inside).sum())


def _moved_splits(frame: pd.DataFrame, moved: list[dict[str, str]]) -> pd.Series:
    """The split column with the moved rows' new splits: only those rows are looked up (issue 24: no dict per row)."""
    if not moved:
        return frame["split"]
    target = {m["path"]: m["to"] for m in moved}
    rows = frame["path"].isin(list(target)).to_numpy()
    split = frame["split"].copy()
    split[rows] = frame.loc[rows, "path"].map(target).to_numpy()
    return split


def _embeddings(rows: pd.DataFrame, model: ModelConfig, limits: ImageLimits) -> Any:
    """The frozen backbone's embeddings of `rows`, cached per image; TensorFlow is imported only here."""
    from components.modeling import embeddings

    root = workspace_root()
    return embeddings.embed_frame(rows, model, limits, root / EMBEDDING_CACHE, root / ONNX_CACHE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (sections validate, ingest)")
    ValidatePaths.add_arguments(parser)
    return parser


@errors.cli_errors("validate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.use_system_arrow_memory()
    try:
        result = run_validate(load_params(args.params), ValidatePaths.from_args(args))
    except (ParamsError, ValidateInputError) as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    print(_report_text(result))
    return 0 if result.passed else errors.EXIT_USER_ERROR  # the data's fault: a retry fails the same way


def _report_text(result: ValidationResult) -> str:
    lines = []
    if result.passed:
        lines.append(
            f"validate: passed ({result.policy}): {result.valid} of {result.files} files kept, "
            f"{result.quarantined} quarantined -> {result.out_manifest}"
        )
    else:
        lines.append(f"validate: FAILED (policy {result.policy}), {len(result.problems)} problem(s):")
        lines += [f"  - {p}" for p in result.problems]
    if result.quarantined and result.policy == "quarantine":
        lines.append(f"quarantined {result.quarantined} file(s) ({result.quarantine_path}):")
        lines += [f"  - {q}" for q in result.quarantined_files[:MAX_LISTED]]
        if result.quarantined > MAX_LISTED:
            lines.append(f"  ... and {result.quarantined - MAX_LISTED} more in {result.quarantine_path}")
    lines.append(_near_duplicate_line(result.near_duplicates, result.summary_path.parent / NEAR_DUPLICATE_PICTURE))
    lines += [f"warning: {w}" for w in result.warnings]
    lines.append(f"details: {result.summary_path}; Data Docs: {result.data_docs}")
    return "\n".join(lines)


def _near_duplicate_line(counts: dict[str, Any], picture: Path) -> str:
    if counts.get("policy", "off") == "off":
        return "near-duplicates: not checked (validate.near_duplicates.policy=off)"
    return (
        f"near-duplicates ({counts['policy']}): {counts['groups']} group(s) of {counts['images_in_groups']} "
        f"images: {counts['cross_split']} across splits ({counts['moved_images']} image(s) moved), "
        f"{counts['label_conflicts']} under 2+ labels ({counts['quarantined_images']} quarantined), "
        f"{counts['within_split']} within one split (kept); picture: {picture}"
    )


if __name__ == "__main__":
    runtime.exit_process(main())
