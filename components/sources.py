"""Sources: where ingest's files come from, each kind confined to its own root.

`ingest.source` names one of the kinds in SOURCE_KINDS (the first whose `accepts` says yes).
Adding a kind = one `collect_*` function + one row in SOURCE_KINDS + its tests (tests/unit/test_sources.py).
Every kind returns a Listing: the entries it copied into the new raw_dir, and the entries it
refused, by name and with a reason (they end up in reports/ingest.json; they never fail the run
on their own, and nothing is dropped silently).

What a source may not do, whatever its kind (docs/security.md, "Sources"):
  - read outside its root: only regular files are read; a symlink is followed only when it stays
    inside the root (and `ingest.follow_links_within_root`); hard links (files with more than one
    name) only with `ingest.allow_hard_links`; devices, FIFOs and sockets are never opened; table
    rows must lie in the table's folder (or bucket prefix) or under `ingest.allowed_roots`, and a table
    from a bucket or URL may not name local files;
  - write outside raw_dir: labels are class names (components.layout.clean_label), and every
    target path is resolved and checked to lie inside raw_dir before it is written;
  - deliver more than `ingest.max_files` files or `ingest.max_bytes` bytes (counted while copying);
  - reach hosts or schemes components.urls does not allow.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from components.archives import ARCHIVE_SUFFIXES, ArchiveError, archive_kind, extract_archive
from components.confine import (
    Context,
    Entry,
    IngestError,
    Listing,
    Refused,
    download,
    file_version,
    inside,
    materialise,
    regular_file,
    walk_tree,
)
from components.credentials import redact
from components.errors import printable
from components.layout import (
    SPLIT_ALIASES,
    BadLabel,
    Planned,
    case_variants,
    clean_label,
    is_hidden,
    plan_layout,
    safe_relative,
)
from components.stage_config import IngestConfig
from components.urls import URLRefused, check_scheme, is_remote, open_remote, remote_info

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
MAX_REFUSALS_LISTED = 1000  # in the report; refused_count has them all


# --------------------------------------------------------------------------------------------
# Trees: folders, extracted archives, bucket folders


Plan = tuple[str, list[tuple[Planned, str, str]], dict[str, int], list[str]]


def plan_entries(names: list[str], dirs: list[str], shown_root: str, ctx: Context) -> Plan:
    """Labels off a tree, checked: (layout, [(planned, label, rel in raw_dir)], class folders, ignored)."""
    layout, planned, folders, ignored = plan_layout(names, dirs)
    depth = 2 if layout == "split_folders" else 1
    labelled, bad_folders = [], set()
    for p in planned:
        try:
            labelled.append((p, clean_label(p.label)))
        except BadLabel as exc:
            ctx.refuse(f"{shown_root}/{p.rel}", f"class folder {p.label!r} is not a usable label: {exc}")
            bad_folders.add("/".join(p.rel.split("/")[:depth]))
    folder_labels = {f: _folder_label(f) for f in folders if f not in bad_folders}
    variants = case_variants([label for _, label in labelled] + [v for v in folder_labels.values() if v])
    kept, taken = [], set()
    for p, label in labelled:
        if label in variants:
            ctx.refuse(f"{shown_root}/{p.rel}", case_variant_reason(label, variants))
            continue
        parts = p.rel.split("/")
        rel = "/".join([*parts[: depth - 1], label, *parts[depth:]])
        if rel in taken:
            ctx.refuse(f"{shown_root}/{p.rel}", "another file has the same name once labels are Unicode-normalised")
            continue
        taken.add(rel)
        kept.append((p, label, rel))
    classes: dict[str, int] = {}
    for folder, label in folder_labels.items():
        if label and label not in variants:
            key = "/".join([*folder.split("/")[:-1], label])
            classes[key] = classes.get(key, 0) + folders[folder]
    return layout, kept, classes, ignored


def _folder_label(folder: str) -> str | None:
    try:
        return clean_label(folder.split("/")[-1])
    except BadLabel:
        return None


def case_variant_reason(label: str, variants: dict[str, str]) -> str:
    return f"label {label!r} differs only in case from the class {variants[label]!r} (one folder on Windows and macOS)"


def collect_folder(source: str, ctx: Context) -> Listing:
    shown = local_path(source)
    root = shown.resolve()  # the params author names the root; links below it are the data's
    follow = ctx.config.follow_links_within_root
    found, dirs, followed = walk_tree(root, ctx, follow)
    layout, planned, folders, ignored = plan_entries(sorted(found), dirs, str(shown), ctx)
    entries = []
    for p, label, rel in planned:
        real, st = found[p.rel]
        entries.append(
            Entry(
                rel,
                label,
                p.given_split,
                str(shown / p.rel),
                str(real),
                p.hidden,
                size=st.st_size,
                identity=(st.st_dev, st.st_ino),
            )
        )
    entries = materialise(entries, ctx)
    notes = (
        [f"followed {followed} symbolic link(s) that stay inside the source root (ingest.follow_links_within_root)"]
        if followed
        else []
    )
    return Listing("folder", layout, entries, folders, ignored, notes=notes)


def collect_archive(location: str, ctx: Context) -> Listing:
    archive = download(location, ctx) if is_remote(location) else local_path(location)
    version = file_version(os.stat(archive))  # a replaced archive changes this, so its members are inspected again
    extract_root = ctx.staging / "extract"
    print(f"ingest: extracting {printable(archive.name)}", file=sys.stderr)
    try:
        extract_archive(
            archive, extract_root, ctx.config.max_bytes, ctx.config.max_files, ctx.config.max_archive_metadata_bytes
        )
    except ArchiveError as exc:
        raise IngestError(str(exc)) from None
    root, strays = unwrap_single_top(extract_root)
    found, dirs, _ = walk_tree(root, ctx, follow_links=False)  # our own extraction: links were refused already
    layout, planned, folders, ignored = plan_entries(sorted(found), dirs, redact(location), ctx)
    entries = []
    for p, label, rel in planned:
        src = root / p.rel
        member = src.relative_to(extract_root).as_posix()
        try:
            target = inside(ctx.dest, rel)
        except Refused as exc:
            ctx.refuse(f"{location}!{member}", str(exc))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)  # our own extracted copy: moving it costs nothing
        entries.append(
            Entry(
                rel,
                label,
                p.given_split,
                f"{redact(location)}!{member}",
                None,
                p.hidden,
                size=found[p.rel][1].st_size,
                version=version,
            )
        )
    return Listing("archive", layout, entries, folders, sorted(strays + ignored))


def unwrap_single_top(root: Path) -> tuple[Path, list[str]]:
    """An archive's lone top folder (e.g. flower_photos/) becomes the root; stray top files are ignored."""
    entries = [p for p in root.iterdir() if not is_hidden(p.name)]
    dirs = [p for p in entries if p.is_dir() and not p.is_symlink()]
    if len(dirs) == 1 and dirs[0].name.lower() not in SPLIT_ALIASES:
        strays = [p.name for p in entries if p not in dirs]
        return dirs[0], strays
    return root, []


def collect_remote_folder(url: str, ctx: Context) -> Listing:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise IngestError(f"source {redact(url)}: a URL must name an archive, a CSV/Parquet table, or a bucket folder")
    root = root.rstrip("/")
    names: dict[str, dict[str, Any]] = {}
    dirs: list[str] = []
    for here, subdirs, objects in fs.walk(root, detail=True):
        rel_here = posixpath.relpath(here.rstrip("/"), root)
        dirs += [posixpath.normpath(posixpath.join(rel_here, d)) for d in subdirs]
        for name, info in objects.items():
            rel = posixpath.join(rel_here, name) if rel_here != "." else name
            if not safe_relative(rel) or posixpath.normpath(rel) != rel:
                ctx.refuse(f"{url.rstrip('/')}/{rel}", "object name with '..' or empty parts")
                continue
            names[rel] = info
        if len(names) > ctx.config.max_files:
            break  # materialise refuses the source; stop listing a huge bucket early
    layout, planned, folders, ignored = plan_entries(sorted(names), sorted(set(dirs) - {"."}), url.rstrip("/"), ctx)
    entries = []
    for p, label, rel in planned:
        info = names[p.rel]
        location = f"{url.rstrip('/')}/{p.rel}"  # as the user spelled the source
        entries.append(
            Entry(
                rel,
                label,
                p.given_split,
                redact(location),
                location,
                p.hidden,
                size=int(info.get("size") or 0),  # declared; the version is the sha256 of the bytes copied
            )
        )
    return Listing("remote-folder", layout, materialise(entries, ctx), folders, ignored)


# --------------------------------------------------------------------------------------------
# Tables: rows of (path or URI, label[, split]), confined to the table's folder or bucket prefix

OUTSIDE = "outside the table's folder or bucket prefix (and ingest.allowed_roots)"


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
    entry.fetch, entry.size, entry.identity = str(path), st.st_size, (st.st_dev, st.st_ino)


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


# --------------------------------------------------------------------------------------------
# The table of source kinds


def local_path(source: str) -> Path:
    """A local source as an absolute path (relative ones against cwd)."""
    path = Path(strip_file_scheme(source)).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def strip_file_scheme(location: str) -> str:
    return location[len("file://") :] if location.startswith("file://") else location


def _suffix(source: str) -> str:
    return source.lower().split("?")[0].split("#")[0]


def _is_archive(source: str) -> bool:
    return bool(archive_kind(source)) and (is_remote(source) or local_path(source).is_file())


def _is_table(source: str) -> bool:
    return _suffix(source).endswith(TABLE_SUFFIXES) and (is_remote(source) or local_path(source).is_file())


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


def check_no_overlap(source: Path, raw_dir: Path) -> None:
    """Refuse a source inside raw_dir (it would be replaced) or raw_dir inside a source folder."""
    src, raw = source.resolve(), raw_dir.resolve()
    if src == raw or raw in src.parents or (source.is_dir() and src in raw.parents):
        raise IngestError(f"source {source} and raw_dir {raw_dir} overlap: ingest would write into its own source")


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
