"""The tables validate's suites check: one row per file with derived columns, one row per class.

Facts are derived with pandas first, so that the expectations stay simple column checks
(components/quality/validation_checks.py).
"""

from __future__ import annotations

import functools
import posixpath

import numpy as np
import pandas as pd
from PIL import Image

from components.core.contracts import SPLITS
from components.ingestion.layout import is_hidden


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
    across splits (a leak: copies outside the earliest split are flagged, the earliest is kept).

    Only rows whose content hash repeats are grouped (issue 24: no per-row dict, no copy of the whole table)."""
    conflict_with: dict[str, str] = {}
    copy_of: dict[str, str] = {}
    rank = {s: i for i, s in enumerate(SPLITS)}
    repeated = readable & df["sha256"].duplicated(keep=False)
    for _, group in df.loc[repeated, ["path", "label", "split", "sha256"]].groupby("sha256"):
        if group["label"].nunique() > 1:
            for path, label in zip(group["path"], group["label"]):
                others = group[group["label"] != label]
                conflict_with[path] = ", ".join(f"{p} ({lab})" for p, lab in zip(others["path"], others["label"]))
        if group["split"].nunique() > 1:
            first = min(group["split"], key=lambda s: rank.get(s, len(rank)))
            kept = group.loc[group["split"] == first, "path"].iloc[0]
            for path, split in zip(group["path"], group["split"]):
                if split != first:
                    copy_of[path] = f"{kept} ({first})"
    unflagged = np.where(readable.to_numpy(dtype=bool), False, None)  # True/False for readable files, else None
    for column, flagged in (("label_conflict", conflict_with), ("cross_split_copy", copy_of)):
        values = unflagged.copy()
        values[df["path"].isin(list(flagged)).to_numpy()] = True
        df[column] = pd.Series(values, index=df.index, dtype=object)
    df["conflict_with"] = df["path"].map(conflict_with)
    df["copy_of"] = df["path"].map(copy_of)


def class_table(
    df: pd.DataFrame, passed: pd.Series, classes: list[str] | None, class_folders: dict[str, int]
) -> pd.DataFrame:
    """One row per label seen anywhere (files, expected classes, class folders)."""
    visible = ~df["hidden_file"].astype(bool).to_numpy()
    files = df.loc[visible, ["label"]].groupby("label").size()  # one column copied, not the table (issue 24)
    images = df.loc[passed.to_numpy(), ["label"]].groupby("label").size()
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


def mark_bad_files(df: pd.DataFrame, passed: pd.Series) -> dict[str, int]:
    """Add the `bad_file` column the bad-fraction check averages; return the bad and image counts.

    Hidden files (.DS_Store, Thumbs.db) are clutter, not bad images: they do not count towards max_bad_fraction.
    """
    visible = ~df["hidden_file"].astype(bool)
    df["bad_file"] = [float(not ok) if vis else None for ok, vis in zip(passed, visible)]
    return {"bad": int((~passed & visible).sum()), "images": int(visible.sum())}
