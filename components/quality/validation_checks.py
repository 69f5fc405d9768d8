"""The expectations of validate's three suites, built from `params.yaml`, each with a reason a person can read.

files    - one row per file (validation_tables.derive_columns): each failing file is quarantined;
dataset  - the manifest is not empty and (policy quarantine) at most `max_bad_fraction` is bad;
classes  - one row per class (validation_tables.class_table): enough images, bounded imbalance, no
           empty class folder, and the expected label set when `ingest.classes` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from components.core.stage_config import ValidateConfig


@dataclass(frozen=True)
class Check:
    """One expectation plus how to explain a failure to a person."""

    name: str
    expectation: Any  # a great_expectations Expectation
    explain: Callable[..., str]  # row-level: (row) -> reason; table-level: (observed_value) -> reason
    scope: str  # file | dataset | class


def expect(scope: str, name: str, kind: str, explain: Callable[..., str], **kwargs: Any) -> Check:
    """A check whose GX expectation `kind` (e.g. "ExpectColumnValuesToBeInSet") carries the check's name in
    its meta: a failed result is mapped back to the check, and so to its explanation, by that name."""
    import great_expectations.expectations as gxe

    return Check(name, getattr(gxe, kind)(meta={"check": name}, **kwargs), explain, scope)


def file_checks(config: ValidateConfig) -> list[Check]:
    """Row-level expectations over derive_columns(); each failing file is quarantined."""
    c, allowed = config, list(config.allowed_formats)

    def in_set(name: str, column: str, values: list[Any], explain: Callable[[pd.Series], str]) -> Check:
        return expect("file", name, "ExpectColumnValuesToBeInSet", explain, column=column, value_set=values)

    def between(name: str, column: str, explain: Callable[[pd.Series], str], **bounds: int) -> Check:
        return expect("file", name, "ExpectColumnValuesToBeBetween", explain, column=column, **bounds)

    return [
        in_set("not_hidden", "hidden_file", [False], lambda r: "hidden or system file in a class folder, not an image"),
        expect(
            "file", "decodes", "ExpectColumnValuesToBeNull", lambda r: str(r["decode_error"]), column="decode_error"
        ),
        in_set(
            "format_allowed",
            "format",
            allowed,
            lambda r: f"format {r['format']} is not in validate.allowed_formats {allowed}",
        ),
        between(
            "width_in_range",
            "width",
            lambda r: (
                f"width {r['width']:.0f}px is outside validate.min_width..max_width ({c.min_width}..{c.max_width})"
            ),
            min_value=c.min_width,
            max_value=c.max_width,
        ),
        between(
            "height_in_range",
            "height",
            lambda r: (
                f"height {r['height']:.0f}px is outside validate.min_height..max_height "
                f"({c.min_height}..{c.max_height})"
            ),
            min_value=c.min_height,
            max_value=c.max_height,
        ),
        between(
            "pixels_in_range",
            "pixels",
            lambda r: f"{r['pixels']:,.0f} pixels exceed validate.max_pixels={c.max_pixels:,}",
            max_value=c.max_pixels,
        ),
        in_set(
            "converts_to_rgb",
            "converts_to_rgb",
            [True],
            lambda r: f"colour mode {r['mode']} cannot be converted to RGB",
        ),
        in_set(
            "no_label_conflict",
            "label_conflict",
            [False],
            lambda r: f"label conflict: the same bytes are labelled differently in {r['conflict_with']}",
        ),
        in_set(
            "no_cross_split_copy",
            "cross_split_copy",
            [False],
            lambda r: f"leak: the same bytes are in an earlier split as {r['copy_of']}",
        ),
    ]


def dataset_checks(config: ValidateConfig, counts: dict[str, int]) -> list[Check]:
    """Table-level expectations over all files; `counts` (bad, images) words the bad-fraction reason."""
    checks = [
        expect(
            "dataset",
            "manifest_not_empty",
            "ExpectTableRowCountToBeBetween",
            lambda observed: "the manifest has no rows",
            min_value=1,
        )
    ]
    if config.policy == "quarantine":
        checks.append(
            expect(
                "dataset",
                "bad_fraction",
                "ExpectColumnMeanToBeBetween",
                lambda observed: (
                    f"{counts['bad']} of {counts['images']} files ({observed:.1%}) failed checks, above "
                    f"validate.max_bad_fraction={config.max_bad_fraction:.1%}"
                ),
                column="bad_file",
                max_value=config.max_bad_fraction,
            )
        )
    return checks


def class_checks(config: ValidateConfig, classes: list[str] | None, table: pd.DataFrame) -> list[Check]:
    """Expectations over class_table(): one row per class; a failure fails the run (dropping files cannot fix it)."""
    largest = table.loc[table["images"].idxmax()] if len(table) and table["images"].max() > 0 else None
    checks = [
        expect(
            "class",
            "two_or_more_classes",
            "ExpectTableRowCountToBeBetween",
            lambda observed: f"found {observed} class(es) {table['label'].tolist()}: a classifier needs at least 2",
            min_value=2,
        ),
        expect(
            "class",
            "min_images_per_class",
            "ExpectColumnValuesToBeBetween",
            lambda r: (
                f"{r['images']} usable image(s), fewer than validate.min_images_per_class={config.min_images_per_class}"
            ),
            column="images",
            min_value=config.min_images_per_class,
        ),
        expect(
            "class",
            "class_balance",
            "ExpectColumnValuesToBeBetween",
            lambda r: (
                f"{r['images']} usable images, {r['imbalance']:.1f}x fewer than the largest class "
                f"{largest['label']!r} ({largest['images']}), above validate.max_class_imbalance="
                f"{config.max_class_imbalance:g}"
            ),
            column="imbalance",
            max_value=config.max_class_imbalance,
        ),
        expect(
            "class",
            "no_empty_class_folder",
            "ExpectColumnValuesToBeNull",
            lambda r: f"empty class folder(s): {r['empty_folders']}",
            column="empty_folders",
        ),
    ]
    if classes:
        expected = list(classes)
        checks += [
            expect(
                "class",
                "labels_expected",
                "ExpectColumnValuesToBeInSet",
                lambda r: f"{r['files']} file(s) with this label, which is not in ingest.classes {expected}",
                column="label",
                value_set=expected,
            ),
            expect(
                "class",
                "expected_labels_present",
                "ExpectColumnValuesToBeInSet",
                lambda r: "listed in ingest.classes but no file has this label",
                column="found",
                value_set=[True],
            ),
        ]
    return checks
