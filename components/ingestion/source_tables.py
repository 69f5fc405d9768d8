"""Sources that are tables: CSV/Parquet rows of (path or URI, label[, split]), local or by URL.

A row may point only inside the table's folder (or bucket prefix) or under `ingest.allowed_roots`,
and a table from a bucket or URL may not name local files; the answer for a path outside every root
is the same whether or not it exists. Files from outside the table's folder go to <label>/<name>.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from components.core.credentials import redact
from components.ingestion.confine import (
    Context,
    Entry,
    IngestError,
    Listing,
    Refused,
    file_identity,
    local_path,
    regular_file,
    strip_file_scheme,
)
from components.ingestion.layout import (
    SPLIT_ALIASES,
    BadLabel,
    case_variant_reason,
    case_variants,
    clean_label,
    is_hidden,
    safe_relative,
)
from components.ingestion.source_copy import materialise
from components.ingestion.url_fetch import open_remote, remote_info
from components.ingestion.urls import URLRefused, check_scheme, is_remote

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
OUTSIDE = "outside the table's folder or bucket prefix (and ingest.allowed_roots)"


def is_table_name(location: str) -> bool:
    """Whether a location names a CSV or Parquet file (a URL's query and fragment aside)."""
    return _suffix(location).endswith(TABLE_SUFFIXES)


def _suffix(location: str) -> str:
    return location.lower().split("?")[0].split("#")[0]


@dataclass
class Roots:
    """Where a table's rows may point: local folders (resolved) and URL prefixes (ending in '/')."""

    local: list[Path]
    urls: list[str]

    @classmethod
    def of(cls, base: str, remote_table: bool, allowed: list[str]) -> Roots:
        local = [] if remote_table else [Path(os.path.realpath(base))]
        prefixes = ([base] if remote_table else []) + [r for r in allowed if is_remote(r)]
        local += [Path(os.path.realpath(os.path.expanduser(strip_file_scheme(r)))) for r in allowed if not is_remote(r)]
        keys = [_url_key(p) for p in prefixes]
        return cls(local, [k.rstrip("/") + "/" for k in keys if k])  # '' (a '..' in it) admits nothing

    def local_root(self, real: Path) -> Path | None:
        return next((r for r in self.local if real.is_relative_to(r)), None)

    def holds_url(self, url: str) -> bool:
        key = _url_key(url)
        return bool(key) and any(key.startswith(prefix) for prefix in self.urls)


def _url_key(url: str) -> str:
    """scheme://host/normalised/path for prefix checks; '' when the (decoded) path has '..' segments."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if ".." in path.split("/"):
        return ""
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{posixpath.normpath('/' + path)}"


def read_table(location: str, ctx: Context) -> Any:
    """The table as text columns; at most ingest.max_bytes are read."""
    import pandas as pd

    cap = ctx.config.max_bytes
    try:
        if is_remote(location):
            with open_remote(location, ctx.policy) as fh:
                data = fh.read(cap + 1)
        else:
            with open(local_path(location), "rb") as fh:
                data = fh.read(cap + 1)
    except FileNotFoundError:
        raise IngestError(f"table {redact(location)} not found") from None
    except (OSError, URLRefused) as exc:
        raise IngestError(f"cannot read table {redact(location)}: {exc}") from None
    if len(data) > cap:
        raise IngestError(f"table {redact(location)} is larger than ingest.max_bytes={cap:,}")
    try:
        if _suffix(location).endswith(".csv"):
            return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        return pd.read_parquet(io.BytesIO(data)).fillna("").astype(str)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"cannot read table {redact(location)}: {exc}") from None


def collect_table(location: str, ctx: Context) -> Listing:
    """Rows of (path or uri, label[, split]); relative paths are read against the table's folder."""
    table = read_table(location, ctx)
    path_col = next((c for c in ("path", "uri", "url", "file") if c in table.columns), None)
    if path_col is None or "label" not in table.columns:
        raise IngestError(
            f"table {redact(location)}: needs a 'path' (or 'uri') column and a 'label' column, "
            f"has {list(table.columns)}"
        )
    if len(table) > ctx.config.max_files:
        raise IngestError(
            f"table {redact(location)} has {len(table):,} rows, over ingest.max_files={ctx.config.max_files:,}"
        )
    remote = is_remote(location)
    base = posixpath.dirname(location) if remote else str(local_path(location).parent)
    roots = Roots.of(base, remote, ctx.config.allowed_roots)
    rows = table.to_dict("records")
    variants = case_variants(_usable_labels(row["label"] for row in rows))
    entries, seen = [], set()
    for i, row in enumerate(rows):
        raw_loc = str(row[path_col]).strip()
        split = _table_split(row.get("split", ""), location, i)
        try:
            label = clean_label(row["label"])
            if label in variants:
                raise BadLabel(case_variant_reason(label, variants))
            entry = _table_entry(raw_loc, label, split, base, remote, roots, ctx)
            if entry.origin in seen:
                raise Refused("listed more than once")
        except (BadLabel, Refused) as exc:
            ctx.refuse(f"row {i + 2}: {redact(raw_loc)}", str(exc))
            continue
        seen.add(entry.origin)
        entries.append(entry)
    _name_external_entries(entries)
    return Listing("table", "table", materialise(entries, ctx))


def _usable_labels(raw: Iterable[Any]) -> list[str]:
    labels = []
    for value in raw:
        try:
            labels.append(clean_label(value))
        except BadLabel:
            pass
    return labels


def _table_split(value: Any, location: str, i: int) -> str | None:
    text = str(value or "").strip().lower()
    if not text:
        return None
    if text not in SPLIT_ALIASES:
        raise IngestError(f"table {redact(location)}, row {i + 2}: split {value!r} is not one of train, val, test")
    return SPLIT_ALIASES[text]


def _table_entry(
    raw_loc: str, label: str, split: str | None, base: str, remote_table: bool, roots: Roots, ctx: Context
) -> Entry:
    """The entry for one row, or Refused: outside every root, a local path from a remote table, a bad URL."""
    if not raw_loc:
        raise Refused("empty path")
    if "\0" in raw_loc:
        raise Refused("a NUL character in the path")
    loc = strip_file_scheme(raw_loc)
    if (
        remote_table
        and not is_remote(loc)
        and (os.path.isabs(loc) or raw_loc.startswith("file://") or re.match(r"^[A-Za-z]:", loc))
    ):
        raise Refused("a local path in a table that came from a bucket or URL")
    if is_remote(loc):
        full = loc
    elif remote_table:
        scheme, rest = base.split("://", 1)
        full = f"{scheme}://{posixpath.normpath(posixpath.join(rest, loc))}"
    else:
        full = os.path.normpath(os.path.join(base, loc))
    rel = posixpath.normpath(loc.replace("\\", "/"))
    in_base = not (is_remote(loc) or os.path.isabs(loc)) and safe_relative(rel)
    entry = Entry(rel if in_base else "", label, split, redact(full), full, is_hidden(posixpath.basename(rel)))
    if is_remote(full):
        _stamp_remote(entry, full, roots, ctx)
    else:
        _stamp_local(entry, full, roots, ctx)
    return entry


def _stamp_remote(entry: Entry, url: str, roots: Roots, ctx: Context) -> None:
    try:
        check_scheme(url, ctx.policy)
    except URLRefused as exc:
        raise Refused(str(exc)) from None
    if not roots.holds_url(url):
        raise Refused(OUTSIDE)
    try:
        info = remote_info(url, ctx.policy)
    except URLRefused as exc:
        raise Refused(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot reach: {exc}") from None
    if info is None:
        entry.missing, entry.fetch = True, None
    else:
        entry.size = info["size"]  # declared; the version is the sha256 of the bytes copied (confine._copy_remote)


def _stamp_local(entry: Entry, full: str, roots: Roots, ctx: Context) -> None:
    # Decided on the resolved path before anything is looked up: the answer for a path outside
    # every root is the same whether or not it exists.
    root = roots.local_root(Path(os.path.realpath(full)))
    if root is None:
        raise Refused(OUTSIDE)
    try:
        path, st = regular_file(Path(full), root, ctx.config.follow_links_within_root, ctx.config.allow_hard_links)
    except FileNotFoundError:
        entry.missing, entry.fetch = True, None
        return
    except OSError as exc:
        raise Refused(f"cannot read: {exc.strerror or type(exc).__name__}") from None
    entry.fetch, entry.size, entry.identity = str(path), st.st_size, file_identity(st)


def _name_external_entries(entries: list[Entry]) -> None:
    """Files from outside the table's folder go to <label>/<name>, made unique by a hash if needed."""

    def name_of(e: Entry) -> str:
        base = posixpath.basename(urlsplit(e.origin).path if is_remote(e.origin) else e.origin)
        return f"{e.label}/{base if safe_relative(base) else 'file'}"

    taken = Counter(e.rel for e in entries if e.rel)
    wanted = Counter(name_of(e) for e in entries if not e.rel)
    for e in entries:
        if e.rel:
            continue
        name = name_of(e)
        if taken[name] or wanted[name] > 1:
            stem, ext = posixpath.splitext(name)
            name = f"{stem}-{hashlib.sha256(e.origin.encode()).hexdigest()[:8]}{ext}"
        e.rel = name
