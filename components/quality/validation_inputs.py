"""What validate reads: the ingest manifest and report, checked against each other, and where images may be read.

Both come from the workspace but describe an untrusted source: a malformed, mismatched or stale pair is
refused with a reason (`ValidateInputError`), and a manifest row never makes validate open a file outside
the folder ingest copied the images to.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from components.core.contracts import MANIFEST_COLUMNS, ContractError, IngestReport, read_manifest


class ValidateInputError(ValueError):
    """The manifest or ingest report cannot be validated at all (missing, malformed, mismatched)."""


RECORD_COLUMNS = ["path", "label", "split", "sha256"]
ROWS_AT_ONCE = 1024  # records turned into Python strings at once while a data version is hashed


def relative_records(frame: pd.DataFrame, raw_dir: str | None) -> list[tuple[str, str, str, str]]:
    """(path under raw_dir, label, split, sha256) per row: what a data version is computed from."""
    rel = _relative(raw_dir)
    return [(rel(p), lab, s, h) for p, lab, s, h in zip(frame["path"], frame["label"], frame["split"], frame["sha256"])]


def data_version(frame: pd.DataFrame, raw_dir: str | None) -> str:
    """`records_version(relative_records(frame, raw_dir))`, the same digest without a tuple per row (issue 24):
    Arrow sorts the rows as the records sort (column after column, by code point as Python compares text),
    then they are hashed ROWS_AT_ONCE at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rel = _relative(raw_dir)
    paths = [
        pa.array([rel(p) for p in frame["path"].iloc[start : start + ROWS_AT_ONCE]], type=pa.large_string())
        for start in range(0, len(frame), ROWS_AT_ONCE)
    ]
    columns = {"path": pa.chunked_array(paths, type=pa.large_string())}
    columns |= {name: pa.array(frame[name], from_pandas=True) for name in RECORD_COLUMNS[1:]}
    table = pa.table(columns)
    order = pc.sort_indices(table, sort_keys=[(name, "ascending") for name in RECORD_COLUMNS])
    digest = hashlib.sha256()
    for start in range(0, len(order), ROWS_AT_ONCE):
        part = table.take(order[start : start + ROWS_AT_ONCE])
        for record in zip(*(part.column(name).to_pylist() for name in RECORD_COLUMNS)):
            digest.update("\t".join(record).encode("utf-8"))
            digest.update(b"\n")
    return digest.hexdigest()


def _relative(raw_dir: str | None) -> Callable[[str], str]:
    prefix = raw_dir.rstrip("/") + "/" if raw_dir else None
    return lambda path: posixpath.relpath(path, raw_dir) if prefix and path.startswith(prefix) else path


def read_inputs(manifest_path: Path, ingest_report: Path) -> tuple[pd.DataFrame, IngestReport]:
    """The manifest (every column, each path once) and the ingest report that describes it."""
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
    try:
        info = IngestReport.read(ingest_report)
    except ContractError as exc:
        raise ValidateInputError(f"ingest report: {exc}") from None
    found = data_version(frame, info.raw_dir)
    if info.data_version and info.data_version != found:
        raise ValidateInputError(
            f"{ingest_report} describes another manifest than {manifest_path} "
            f"(data version {info.data_version[:12]} != {found[:12]}): rerun ingest"
        )
    return frame, info


def image_root(info: IngestReport, manifest_path: Path) -> Path:
    """The only folder validate reads images from: ingest's copy (raw_dir), else the manifest's folder."""
    return Path(info.raw_dir) if info.raw_dir else manifest_path.parent


def within(path: str, root: Path) -> bool:
    """Whether `path` (links resolved) lies under `root`: a manifest row never makes us read elsewhere."""
    try:
        return Path(path).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError, ValueError):
        return False
