"""Sources: where ingest's files come from, each kind confined to its own root.

`ingest.source` names one of the kinds in SOURCE_KINDS (the first whose `accepts` says yes): trees
(folders, archives, bucket folders) are collected in components/ingestion/source_trees.py, tables in
components/ingestion/source_tables.py. Adding a kind = one `collect_*` function + one row in SOURCE_KINDS + its
tests (tests/unit/test_sources.py).
Every kind returns a Listing: the entries it copied into the new raw_dir, and the entries it
refused, by name and with a reason (they end up in reports/ingest.json; they never fail the run
on their own, and nothing is dropped silently).

What a source may not do, whatever its kind (docs/security.md, "Sources"):
  - read outside its root: only regular files are read; a symlink is followed only when it stays
    inside the root (and `ingest.follow_links_within_root`); hard links (files with more than one
    name) only with `ingest.allow_hard_links`; devices, FIFOs and sockets are never opened; table
    rows must lie in the table's folder (or bucket prefix) or under `ingest.allowed_roots`, and a table
    from a bucket or URL may not name local files;
  - write outside raw_dir: labels are class names (components.ingestion.layout.clean_label), and every
    target path is resolved and checked to lie inside raw_dir before it is written;
  - deliver more than `ingest.max_files` files or `ingest.max_bytes` bytes (counted while copying);
  - reach hosts or schemes components.ingestion.urls does not allow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components.core.credentials import redact
from components.core.stage_config import IngestConfig
from components.ingestion.archives import ARCHIVE_SUFFIXES, archive_kind
from components.ingestion.confine import Context, IngestError, Listing, check_no_overlap, local_path, strip_file_scheme
from components.ingestion.source_tables import collect_table, is_table_name
from components.ingestion.source_trees import collect_archive, collect_folder, collect_remote_folder
from components.ingestion.urls import URLRefused, check_scheme, is_remote


def _is_archive(source: str) -> bool:
    return bool(archive_kind(source)) and (is_remote(source) or local_path(source).is_file())


def _is_table(source: str) -> bool:
    return is_table_name(source) and (is_remote(source) or local_path(source).is_file())


def _is_local_folder(source: str) -> bool:
    return not is_remote(source) and local_path(source).is_dir()


def _is_bucket_folder(source: str) -> bool:
    return is_remote(source) and not source.lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class SourceKind:
    accepts: Callable[[str], bool]  # given ingest.source (file:// stripped)
    collect: Callable[[str, Context], Listing]
    description: str


SOURCE_KINDS: dict[str, SourceKind] = {
    "archive": SourceKind(_is_archive, collect_archive, f"archive ({', '.join(ARCHIVE_SUFFIXES)}), local or by URL"),
    "table": SourceKind(
        _is_table, collect_table, "CSV/Parquet table of (path or URI, label[, split]), local or by URL"
    ),
    "folder": SourceKind(_is_local_folder, collect_folder, "local folder of <class>/ or <split>/<class>/ folders"),
    "remote-folder": SourceKind(
        _is_bucket_folder, collect_remote_folder, "bucket folder (s3://, gs://) through fsspec"
    ),
}


def collect_source(config: IngestConfig, dest: Path, staging: Path, downloads: Path, raw_dir: Path) -> Listing:
    """Bring the source's files into dest (the new raw_dir) and list them, with what was refused."""
    source = strip_file_scheme(config.source)
    ctx = Context(config, dest, staging, downloads, raw_dir)
    if is_remote(source):
        try:
            check_scheme(source, ctx.policy)
        except URLRefused as exc:
            raise IngestError(f"source {redact(source)}: {exc}") from None
    else:
        path = local_path(source)
        if not path.exists():
            raise IngestError(f"source {config.source!r} not found (looked at {path})")
        check_no_overlap(path, raw_dir)
    for kind in SOURCE_KINDS.values():
        if kind.accepts(source):
            listing = kind.collect(source, ctx)
            listing.refused = ctx.refused
            return listing
    if is_remote(source):
        raise IngestError(
            f"source {redact(source)}: a URL must name an archive, a CSV/Parquet table, or a bucket folder"
        )
    raise IngestError(
        f"source {local_path(source)}: not a folder, archive ({', '.join(ARCHIVE_SUFFIXES)}) or table (.csv/.parquet)"
    )
