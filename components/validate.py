"""Validate: a Great Expectations suite over the ingest manifest; bad files are quarantined or fail the run.

Three suites, built in code from `params.yaml` (section `validate`, plus `ingest.classes`):
  files    - one row per file: readable, not hidden, allowed format, size and pixel limits, colour mode
             convertible to RGB, no byte-identical copy under another label (label conflict) or in
             another split (leak);
  dataset  - the manifest is not empty and (policy quarantine) at most `max_bad_fraction` is bad;
  classes  - one row per class: enough images, bounded imbalance, no empty class folder, and the
             expected label set when `ingest.classes` is given.
Then, on the files that passed, near-duplicates (components/near_duplicates.py, setting
`validate.near_duplicates`): perceptual-hash groups under 2+ labels are quarantined, groups across
splits are moved to one split (or reported, or fail the run), before the class checks count images.
Policy `quarantine` drops failing files (listed in quarantine.csv) and fails only when a check that
cannot be fixed by dropping files fails; policy `fail` fails on any problem. Outputs: the rows that
passed with their (possibly moved) splits (`data/validated.csv`, manifest columns),
`reports/validation/summary.json`, `quarantine.csv`, `near_duplicates.png` and Great Expectations
Data Docs under `reports/validation/data_docs/`. Each suite runs as a GX Checkpoint whose actions
(`checkpoint_actions`: UpdateDataDocsAction, and any Slack or e-mail action added there) write the
Data Docs. The CLI exits 2 when validation fails (the data's
fault: the flow does not retry it).
"""

from __future__ import annotations

import argparse
import functools
import posixpath
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from components import errors, files, near_duplicates
from components.config import ParamsError, load_params
from components.contracts import (
    MANIFEST_COLUMNS,
    SPLITS,
    ContractError,
    IngestReport,
    ValidationSummary,
    read_manifest,
    write_manifest,
)
from components.hashing import records_version
from components.images import ImageLimits
from components.layout import is_hidden
from components.settings import workspace_root
from components.stage_config import ValidateConfig

MAX_LISTED = 50  # quarantined files echoed to the terminal; all are in quarantine.csv
NEAR_DUPLICATE_CACHE = "data/cache/near_duplicates.npz"  # under the workspace root: shared by dvc exp runs
NEAR_DUPLICATE_PICTURE = "near_duplicates.png"  # in the report folder
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class ValidateInputError(ValueError):
    """The manifest or ingest report cannot be validated at all (missing, malformed, mismatched)."""


@dataclass(frozen=True)
class ValidationResult:
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


@dataclass(frozen=True)
class Check:
    """One expectation plus how to explain a failure to a person."""

    name: str
    expectation: Any  # a great_expectations Expectation
    explain: Callable[..., str]  # row-level: (row) -> reason; table-level: (observed_value) -> reason
    scope: str  # file | dataset | class


# --------------------------------------------------------------------------------------------
# Derived columns (pandas first, so that expectations stay simple column checks)


@functools.cache
def converts_to_rgb(mode: str) -> bool:
    """Whether Pillow can convert an image of this colour mode to RGB (probed once per mode)."""
    try:
        Image.new(mode, (1, 1)).convert("RGB")
    except (ValueError, OSError, KeyError):
        return False
    return True


def derive_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns the file checks read; facts of unreadable files are null so only one check flags them."""
    df = frame.copy().set_index("path", drop=False)
    for col in ("width", "height", "bytes"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    hidden = df["path"].map(lambda p: is_hidden(posixpath.basename(p)))
    readable = (df["error"] == "") & ~hidden
    df["hidden_file"] = hidden.astype(object)
    df["decode_error"] = _only(df["error"], ~hidden & (df["error"] != ""))
    df["format"] = _only(df["format"], readable)
    df["mode"] = _only(df["mode"], readable)
    df["width"] = df["width"].where(readable)
    df["height"] = df["height"].where(readable)
    df["pixels"] = df["width"] * df["height"]
    df["converts_to_rgb"] = _only(df["mode"].map(lambda m: isinstance(m, str) and converts_to_rgb(m)), readable)
    _mark_duplicates(df, readable)
    return df


def _only(values: pd.Series, keep: pd.Series) -> pd.Series:
    return pd.Series([v if k else None for v, k in zip(values, keep)], index=values.index, dtype=object)


def _mark_duplicates(df: pd.DataFrame, readable: pd.Series) -> None:
    """Byte-identical readable files: under 2+ labels (a label conflict: every copy is flagged) and
    across splits (a leak: copies outside the earliest split are flagged, the earliest is kept)."""
    conflict = {p: (False if r else None) for p, r in zip(df["path"], readable)}
    leak = dict(conflict)
    conflict_with: dict[str, str] = {}
    copy_of: dict[str, str] = {}
    rank = {s: i for i, s in enumerate(SPLITS)}
    for _, group in df[readable].groupby("sha256"):
        if len(group) < 2:
            continue
        if group["label"].nunique() > 1:
            for path, label in zip(group["path"], group["label"]):
                conflict[path] = True
                others = group[group["label"] != label]
                conflict_with[path] = ", ".join(f"{p} ({lab})" for p, lab in zip(others["path"], others["label"]))
        if group["split"].nunique() > 1:
            first = min(group["split"], key=lambda s: rank.get(s, len(rank)))
            kept = group.loc[group["split"] == first, "path"].iloc[0]
            for path, split in zip(group["path"], group["split"]):
                if split != first:
                    leak[path] = True
                    copy_of[path] = f"{kept} ({first})"
    df["label_conflict"] = df["path"].map(conflict).astype(object)
    df["cross_split_copy"] = df["path"].map(leak).astype(object)
    df["conflict_with"] = df["path"].map(conflict_with)
    df["copy_of"] = df["path"].map(copy_of)


# --------------------------------------------------------------------------------------------
# The suites


def file_checks(config: ValidateConfig) -> list[Check]:
    """Row-level expectations over derive_columns(); each failing file is quarantined."""
    import great_expectations.expectations as gxe

    def expect(cls: Any, name: str, explain: Callable[[pd.Series], str], **kwargs: Any) -> Check:
        return Check(name, cls(meta={"check": name}, **kwargs), explain, "file")

    c, allowed = config, list(config.allowed_formats)
    return [
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "not_hidden",
            lambda r: "hidden or system file in a class folder, not an image",
            column="hidden_file",
            value_set=[False],
        ),
        expect(gxe.ExpectColumnValuesToBeNull, "decodes", lambda r: str(r["decode_error"]), column="decode_error"),
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "format_allowed",
            lambda r: f"format {r['format']} is not in validate.allowed_formats {allowed}",
            column="format",
            value_set=allowed,
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "width_in_range",
            lambda r: (
                f"width {r['width']:.0f}px is outside validate.min_width..max_width ({c.min_width}..{c.max_width})"
            ),
            column="width",
            min_value=c.min_width,
            max_value=c.max_width,
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "height_in_range",
            lambda r: (
                f"height {r['height']:.0f}px is outside validate.min_height..max_height "
                f"({c.min_height}..{c.max_height})"
            ),
            column="height",
            min_value=c.min_height,
            max_value=c.max_height,
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "pixels_in_range",
            lambda r: f"{r['pixels']:,.0f} pixels exceed validate.max_pixels={c.max_pixels:,}",
            column="pixels",
            max_value=c.max_pixels,
        ),
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "converts_to_rgb",
            lambda r: f"colour mode {r['mode']} cannot be converted to RGB",
            column="converts_to_rgb",
            value_set=[True],
        ),
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "no_label_conflict",
            lambda r: f"label conflict: the same bytes are labelled differently in {r['conflict_with']}",
            column="label_conflict",
            value_set=[False],
        ),
        expect(
            gxe.ExpectColumnValuesToBeInSet,
            "no_cross_split_copy",
            lambda r: f"leak: the same bytes are in an earlier split as {r['copy_of']}",
            column="cross_split_copy",
            value_set=[False],
        ),
    ]


def dataset_checks(config: ValidateConfig, counts: dict[str, int]) -> list[Check]:
    import great_expectations.expectations as gxe

    not_empty = gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"check": "manifest_not_empty"})
    checks = [Check("manifest_not_empty", not_empty, lambda observed: "the manifest has no rows", "dataset")]
    if config.policy == "quarantine":
        checks.append(
            Check(
                "bad_fraction",
                gxe.ExpectColumnMeanToBeBetween(
                    column="bad_file", max_value=config.max_bad_fraction, meta={"check": "bad_fraction"}
                ),
                lambda observed: (
                    f"{counts['bad']} of {counts['images']} files ({observed:.1%}) failed checks, above "
                    f"validate.max_bad_fraction={config.max_bad_fraction:.1%}"
                ),
                "dataset",
            )
        )
    return checks


def class_checks(config: ValidateConfig, classes: list[str] | None, table: pd.DataFrame) -> list[Check]:
    import great_expectations.expectations as gxe

    def expect(cls: Any, name: str, explain: Callable[[Any], str], **kwargs: Any) -> Check:
        return Check(name, cls(meta={"check": name}, **kwargs), explain, "class")

    largest = table.loc[table["images"].idxmax()] if len(table) and table["images"].max() > 0 else None
    checks = [
        expect(
            gxe.ExpectTableRowCountToBeBetween,
            "two_or_more_classes",
            lambda observed: f"found {observed} class(es) {table['label'].tolist()}: a classifier needs at least 2",
            min_value=2,
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "min_images_per_class",
            lambda r: (
                f"{r['images']} usable image(s), fewer than validate.min_images_per_class={config.min_images_per_class}"
            ),
            column="images",
            min_value=config.min_images_per_class,
        ),
        expect(
            gxe.ExpectColumnValuesToBeBetween,
            "class_balance",
            lambda r: (
                f"{r['images']} usable images, {r['imbalance']:.1f}x fewer than the largest class "
                f"{largest['label']!r} ({largest['images']}), above validate.max_class_imbalance="
                f"{config.max_class_imbalance:g}"
            ),
            column="imbalance",
            max_value=config.max_class_imbalance,
        ),
        expect(
            gxe.ExpectColumnValuesToBeNull,
            "no_empty_class_folder",
            lambda r: f"empty class folder(s): {r['empty_folders']}",
            column="empty_folders",
        ),
    ]
    if classes:
        checks += [
            expect(
                gxe.ExpectColumnValuesToBeInSet,
                "labels_expected",
                lambda r: f"{r['files']} file(s) with this label, which is not in ingest.classes {list(classes)}",
                column="label",
                value_set=list(classes),
            ),
            expect(
                gxe.ExpectColumnValuesToBeInSet,
                "expected_labels_present",
                lambda r: "listed in ingest.classes but no file has this label",
                column="found",
                value_set=[True],
            ),
        ]
    return checks


def class_table(
    df: pd.DataFrame, passed: pd.Series, classes: list[str] | None, class_folders: dict[str, int]
) -> pd.DataFrame:
    """One row per label seen anywhere (files, expected classes, class folders)."""
    visible = df[~df["hidden_file"].astype(bool)]
    files = visible.groupby("label").size()
    images = df[passed].groupby("label").size()
    empty: dict[str, list[str]] = {}
    for folder, count in class_folders.items():
        if count == 0:
            empty.setdefault(folder.split("/")[-1], []).append(folder)
    labels = sorted(set(files.index) | set(classes or []) | {f.split("/")[-1] for f in class_folders})
    table = pd.DataFrame({"label": labels})
    table["files"] = [int(files.get(label, 0)) for label in labels]
    table["images"] = [int(images.get(label, 0)) for label in labels]
    table["found"] = (table["files"] > 0).astype(object)
    biggest = table["images"].max() if len(table) else 0
    table["imbalance"] = [biggest / n if n else None for n in table["images"]]
    table["empty_folders"] = pd.Series(
        [", ".join(empty[lab]) if lab in empty else None for lab in labels], dtype=object
    )
    return table.set_index("label", drop=False)


DATA_DOCS_SITE = "pipeline"  # the context's only Data Docs site: reports/validation/data_docs


def checkpoint_actions() -> list[Any]:
    """What every suite's Checkpoint does after validating: update the Data Docs site.

    GX runs UpdateDataDocsAction before any other action, so an action added here (GX's
    SlackNotificationAction, EmailAction, ...) can link to the pages it built.
    """
    from great_expectations.checkpoint import UpdateDataDocsAction

    return [UpdateDataDocsAction(name="update_data_docs", site_names=[DATA_DOCS_SITE])]


class Suites:
    """An ephemeral GX context whose Data Docs site is a folder we choose; each suite runs as a Checkpoint.

    The suites run one after another (the dataset and class checks count only the files the file
    checks kept), so each has its own Checkpoint, named like its suite.
    """

    def __init__(self, docs_dir: Path) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        from components.data_docs import site_config

        self.gx = gx
        site = site_config(docs_dir)  # names from the source are shown as text, never as HTML
        config = DataContextConfig(
            # No default site: it would write into a fresh temporary folder on every run.
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites={DATA_DOCS_SITE: site},
            progress_bars=ProgressBarsConfig(globally=False),
            analytics_enabled=False,  # no usage statistics from an offline pipeline
        )
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self.source = self.context.data_sources.add_pandas("images")

    def run(self, name: str, frame: pd.DataFrame, checks: list[Check], key: str) -> Any:
        """Run one suite through its Checkpoint; the checkpoint's actions update the Data Docs."""
        gx = self.gx
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        for check in checks:
            suite.add_expectation(check.expectation)
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        checkpoint = self.context.checkpoints.add(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                actions=checkpoint_actions(),
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame.reset_index(drop=True)})
        (result,) = outcome.run_results.values()
        return result


@dataclass
class Failure:
    check: str
    scope: str
    expectation: str
    items: list[dict[str, str]] = field(default_factory=list)  # {subject..., reason}


def _exception_message(info: Any) -> str | None:
    """GX reports an expectation that crashed either flat or keyed by metric: find the message."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "unknown error")
    return next((m for v in info.values() if (m := _exception_message(v))), None)


def collect_failures(result: Any, checks: list[Check], table: pd.DataFrame, key: str) -> list[Failure]:
    """Turn a GX validation result into failures that name each file (or class) and why."""
    by_name = {c.name: c for c in checks}
    failures = []
    for outcome in result.results:
        if outcome.success:
            continue
        check = by_name[outcome.expectation_config.meta["check"]]
        failure = Failure(check.name, check.scope, outcome.expectation_config.type)
        crash = _exception_message(outcome.exception_info)
        if crash:
            failure.items.append({"subject": check.name, "reason": f"check {check.name} could not run: {crash}"})
        elif "unexpected_index_list" in outcome.result:
            for hit in outcome.result["unexpected_index_list"]:
                row = table.loc[hit[key]]
                failure.items.append({key: hit[key], "reason": check.explain(row)})
        else:
            failure.items.append({"subject": check.name, "reason": check.explain(outcome.result.get("observed_value"))})
        failures.append(failure)
    return failures


# --------------------------------------------------------------------------------------------
# Summary pieces


def _file_reasons(failures: list[Failure], df: pd.DataFrame) -> pd.DataFrame:
    """One row per failing file: path, label, split, the checks it failed and why."""
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
    return pd.DataFrame(rows, columns=["path", "label", "split", "checks", "reason"])


def _warnings(df: pd.DataFrame, passed: pd.Series) -> list[str]:
    notes = []
    kept = df[passed]
    same = kept[kept.duplicated("sha256", keep=False)].groupby("sha256")["path"].apply(list)
    if len(same):
        pairs = "; ".join(" = ".join(paths) for paths in same.tolist()[:10])
        notes.append(f"{len(same)} group(s) of byte-identical files under one label and split (kept): {pairs}")
    for split in SPLITS:
        in_split = kept[kept["split"] == split]
        if in_split.empty:
            notes.append(f"split {split!r} has no usable images")
            continue
        absent = sorted(set(kept["label"]) - set(in_split["label"]))
        if absent:
            notes.append(f"split {split!r} has no usable images of class(es) {absent}")
    deep = kept[kept["mode"].isin(SIXTEEN_BIT_MODES)]
    if len(deep):
        notes.append(
            f"{len(deep)} image(s) with 32/16-bit modes {sorted(set(deep['mode']))}: kept, and scaled to 8 bits "
            "when loaded (components.data.load_rgb)"
        )
    return notes


def _relative_records(frame: pd.DataFrame, raw_dir: str | None) -> list[tuple[str, str, str, str]]:
    def rel(path: str) -> str:
        return posixpath.relpath(path, raw_dir) if raw_dir and path.startswith(raw_dir.rstrip("/") + "/") else path

    return [(rel(p), lab, s, h) for p, lab, s, h in zip(frame["path"], frame["label"], frame["split"], frame["sha256"])]


def _read_inputs(manifest_path: Path, ingest_report: Path | None) -> tuple[pd.DataFrame, IngestReport | None]:
    try:
        frame = read_manifest(manifest_path)
    except FileNotFoundError:
        raise ValidateInputError(f"manifest {manifest_path} not found: run ingest first") from None
    except ValueError as exc:
        raise ValidateInputError(str(exc)) from None
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValidateInputError(f"{manifest_path}: missing column(s) {missing}")
    repeated = frame.loc[frame["path"].duplicated(), "path"].tolist()
    if repeated:
        raise ValidateInputError(f"{manifest_path}: path(s) listed more than once: {repeated[:5]}")
    info = None
    if ingest_report is not None:
        try:
            info = IngestReport.read(ingest_report)
        except ContractError as exc:
            raise ValidateInputError(f"ingest report: {exc}") from None
        found = records_version(_relative_records(frame, info.raw_dir))
        if info.data_version and info.data_version != found:
            raise ValidateInputError(
                f"{ingest_report} describes another manifest than {manifest_path} "
                f"(data version {info.data_version[:12]} != {found[:12]}): rerun ingest"
            )
    return frame, info


# --------------------------------------------------------------------------------------------
# Entry points


def run_validate(
    config: ValidateConfig,
    classes: list[str] | None,
    manifest_path: str | Path,
    out_manifest: str | Path,
    report_dir: str | Path,
    ingest_report: str | Path | None = None,
) -> ValidationResult:
    """Check every file and class; write the passing rows, the quarantine list, a summary and Data Docs."""
    manifest_path, out_manifest, report_dir = Path(manifest_path), Path(out_manifest), Path(report_dir)
    frame, info = _read_inputs(manifest_path, Path(ingest_report) if ingest_report else None)
    df = derive_columns(frame)
    with files.atomic_dir(report_dir) as tmp:
        suites = Suites(tmp / "data_docs")
        checks = file_checks(config)
        file_failures = collect_failures(suites.run("files", df, checks, "path"), checks, df, "path")
        quarantine = _file_reasons(file_failures, df)
        passed = ~df["path"].isin(quarantine["path"])
        moved, nd, unhashed = _near_duplicates(config, frame, passed, _image_root(info, manifest_path), tmp)
        df["split"] = moved["split"].to_numpy()  # moved splits, for the per-split counts and warnings
        quarantine = pd.concat([quarantine, nd.quarantine], ignore_index=True) if len(nd.quarantine) else quarantine
        passed = ~df["path"].isin(quarantine["path"])
        visible = ~df["hidden_file"].astype(bool)
        counts = {"bad": int((~passed & visible).sum()), "images": int(visible.sum())}
        # Hidden files (.DS_Store, Thumbs.db) are clutter, not bad images: they do not count towards max_bad_fraction.
        df["bad_file"] = [float(not ok) if vis else None for ok, vis in zip(passed, visible)]
        checks = dataset_checks(config, counts)
        set_failures = collect_failures(suites.run("dataset", df, checks, "path"), checks, df, "path")
        table = class_table(df, passed, classes, info.class_folders if info else {})
        checks = class_checks(config, classes, table)
        set_failures += collect_failures(suites.run("classes", table, checks, "label"), checks, table, "label")
        problems = [_line(f, item) for f in set_failures for item in f.items] + nd.problems
        if config.policy == "fail":
            problems += [f"{r.path}: {r.reason}" for r in quarantine.itertuples()]
        ok = not problems
        raw_dir = info.raw_dir if info else None
        given = info.data_version if info else ""
        versions = {
            "data_version": given or records_version(_relative_records(frame, raw_dir)),
            "validated_version": records_version(_relative_records(moved[passed.to_numpy()], raw_dir)),
        }
        warnings = _warnings(df, passed)
        if unhashed:
            warnings.append(
                f"{unhashed} row(s) outside the ingested image folder were not checked for "
                "near-duplicates (validate reads images only under the ingest report's raw_dir)"
            )
        if info and info.refused_count:
            warnings.append(
                f"ingest refused {info.refused_count} entr{'y' if info.refused_count == 1 else 'ies'} "
                "the source offered (links out of the source, special files, rows outside the "
                "table's root, bad labels): listed with reasons in the ingest report's `refused`"
            )
        files.write_csv(quarantine, tmp / "quarantine.csv")  # names from the source: no cell starts a formula
        nd_summary = {**nd.to_dict(), "picture": NEAR_DUPLICATE_PICTURE if nd.policy != "off" else None}
        summary = _summary(
            config,
            classes,
            ok,
            problems,
            warnings,
            file_failures + set_failures,
            df,
            passed,
            table,
            counts,
            versions,
            manifest_path,
            info,
            nd_summary,
        )
        summary.write(tmp / "summary.json")
    if ok:
        write_manifest(moved[passed.to_numpy()], out_manifest)
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
        summary_path=report_dir / "summary.json",
        quarantine_path=report_dir / "quarantine.csv",
        data_docs=report_dir / "data_docs" / "index.html",
        out_manifest=out_manifest if ok else None,
        near_duplicates={"policy": nd.policy, **nd.counts},
    )


def _image_root(info: IngestReport | None, manifest_path: Path) -> Path:
    """The only folder validate reads images from: ingest's copy (raw_dir), else the manifest's folder."""
    return Path(info.raw_dir) if info and info.raw_dir else manifest_path.parent


def _within(path: str, root: Path) -> bool:
    """Whether `path` (links resolved) lies under `root`: a manifest row never makes us read elsewhere."""
    try:
        return Path(path).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def _near_duplicates(
    config: ValidateConfig, frame: pd.DataFrame, passed: pd.Series, root: Path, report_tmp: Path
) -> tuple[pd.DataFrame, near_duplicates.NearDuplicateReport, int]:
    """(frame with moved splits, the report, rows not hashed because they lie outside `root`).

    Only files that passed the file checks are hashed, so a conflict or leak is judged among usable images.
    """
    if config.near_duplicates.policy == "off":
        return frame, near_duplicates.NearDuplicateReport("off"), 0
    candidates = frame[passed.to_numpy()]
    inside = candidates["path"].map(lambda p: _within(p, root)).to_numpy(dtype=bool)
    kept, report = near_duplicates.check(
        candidates[inside],
        config.near_duplicates,
        ImageLimits.from_config(config),
        workspace_root() / NEAR_DUPLICATE_CACHE,
        report_tmp / NEAR_DUPLICATE_PICTURE,
    )
    moved = dict(zip(kept["path"], kept["split"]))
    out = frame.copy()
    out["split"] = [moved.get(p, s) for p, s in zip(out["path"], out["split"])]
    return out, report, int((~inside).sum())


def _line(failure: Failure, item: dict[str, str]) -> str:
    if "label" in item:
        return f"class {item['label']!r}: {item['reason']}"
    return item["reason"]


def _summary(
    config: ValidateConfig,
    classes: list[str] | None,
    ok: bool,
    problems: list[str],
    warnings: list[str],
    failures: list[Failure],
    df: pd.DataFrame,
    passed: pd.Series,
    table: pd.DataFrame,
    counts: dict[str, int],
    versions: dict[str, str],
    manifest_path: Path,
    info: IngestReport | None,
    nd_summary: dict[str, Any],
) -> ValidationSummary:
    kept = df[passed]
    ingest = (
        {
            "source": info.source,
            "layout": info.layout,
            "notes": info.notes,
            "class_folders": info.class_folders,
            "refused_count": info.refused_count,
        }
        if info
        else {}
    )
    return ValidationSummary.model_validate(
        {
            "passed": ok,
            "policy": config.policy,
            "manifest": manifest_path.as_posix(),
            **versions,
            "counts": {
                "files": len(df),
                "valid": int(passed.sum()),
                "quarantined": int((~passed).sum()),
                "hidden_files": int(df["hidden_file"].astype(bool).sum()),
                "bad_files": counts["bad"],
                "bad_fraction": round(counts["bad"] / counts["images"], 6) if counts["images"] else 0.0,
                "per_class": {label: int(n) for label, n in table["images"].items()},
                "per_split": {
                    s: {lab: int(n) for lab, n in kept[kept["split"] == s].groupby("label").size().items()}
                    for s in SPLITS
                },
            },
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
            "data_docs": "data_docs/index.html",
            "near_duplicates": nd_summary,
        }
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (sections validate, ingest)")
    parser.add_argument("--manifest", default="data/manifest.csv", help="written by ingest")
    parser.add_argument("--out-manifest", default="data/validated.csv", help="rows that passed")
    parser.add_argument("--report-dir", default="reports/validation", help="summary.json, quarantine.csv, data_docs/")
    parser.add_argument("--ingest-report", default=None, help="reports/ingest.json: class folders and data version")
    return parser


@errors.cli_errors("validate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        result = run_validate(
            params.validate,
            params.ingest.classes,
            args.manifest,
            args.out_manifest,
            args.report_dir,
            args.ingest_report,
        )
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
    sys.exit(main())
