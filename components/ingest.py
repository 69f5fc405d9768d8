"""Ingest: bring a labelled image source into `data/raw` and describe every file in the manifest.

Sources (params `ingest.source`): a folder of class sub-folders, a folder already split into
`train/ val/ test/` (missing splits are carved from train), a CSV/Parquet table of
(path or URI, label[, split]), a `.zip`/`.tar.gz`/`.tgz` archive, local or by URL, or a remote
folder through fsspec (`s3://`, `gs://`, ...). The source is only read, never changed.

Every file is hashed (sha256) and fully decoded with Pillow in a process pool; results are cached
beside `raw_dir` by (source, size, mtime) so a rerun on an unchanged source recomputes nothing.
Splits come from a hash of each image's bytes: adding images never moves an existing one, and
byte-identical files always share a split. Undecodable, hidden and non-image files stay in the
manifest with an `error` so that validate can report them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL
from filelock import FileLock
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from components import runtime, files, errors
from components.config import IngestConfig, ParamsError, SplitFractions, load_params
from components.contracts import MANIFEST_COLUMNS, SPLITS

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SYSTEM_NAMES = {"thumbs.db", "desktop.ini", "__macosx", "icon\r"}
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
CACHE_DIRNAME = ".ingest_cache"
CHUNK = 1 << 20
# Below this many files a process pool costs more to start than it saves.
MIN_FILES_FOR_POOL = 64


class IngestError(ValueError):
    """A problem with the source a user can fix (missing, unsafe or unsupported)."""


@dataclass
class Entry:
    """One file to bring into raw_dir."""

    rel: str  # posix path inside raw_dir
    label: str
    given_split: str | None  # from the source's layout; None = assign from content
    origin: str  # original location: the manifest's `source` column and the cache key
    fetch: str | None = None  # local path or URL to copy from; None = already in place (or missing)
    hidden: bool = False
    missing: bool = False
    size: int = 0
    version: str = ""  # with size, identifies unchanged content (mtime_ns, ETag, ...); '' = unknown


@dataclass
class Listing:
    kind: str  # folder | archive | table | remote-folder
    layout: str  # class_folders | split_folders | table
    entries: list[Entry]
    class_folders: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IngestResult:
    raw_dir: Path
    manifest_path: Path
    report_path: Path
    files: int
    images: int  # files that decoded
    unreadable: int
    bytes: int
    counts: dict[str, dict[str, int]]  # split -> label -> decodable images
    data_version: str
    computed: int  # files hashed and decoded in this run
    cached: int  # files whose facts came from the cache
    workers: int
    seconds: float
    notes: list[str]


# --------------------------------------------------------------------------------------------
# Per-file facts (runs in worker processes)


def inspect_file(path: str, max_pixels: int) -> dict[str, Any]:
    """sha256, size and a full Pillow decode of one file; `error` says why it is unusable."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    facts: dict[str, Any] = {"sha256": digest.hexdigest(), "bytes": size, "format": "", "mode": "",
                             "width": 0, "height": 0, "error": ""}
    if size == 0:
        facts["error"] = "empty file (0 bytes)"
        return facts
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between max_pixels and twice that: treat the warning as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # a full decode: truncated files fail here, not at open()
                facts.update(format=img.format or "", mode=img.mode, width=img.width, height=img.height)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        facts["error"] = f"decompression-bomb guard (max_pixels={max_pixels}): {exc}"
    except UnidentifiedImageError:
        facts["error"] = "not an image: Pillow cannot identify the file"
    except MemoryError:
        raise
    except Exception as exc:  # corrupt files raise many types (OSError, SyntaxError, struct.error, ...)
        facts["error"] = f"cannot decode: {exc}" if str(exc) else f"cannot decode: {type(exc).__name__}"
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    return facts


def _inspect_star(args: tuple[str, int]) -> dict[str, Any]:
    return inspect_file(*args)


# --------------------------------------------------------------------------------------------
# Splits and versions


def split_position(sha256: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the file's bytes."""
    return int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest(), 16) / 2**256


def assign_split(sha256: str, seed: int, fractions: SplitFractions, among: Sequence[str] = SPLITS) -> str:
    """Split of a file from its content hash, with `fractions` renormalised over `among`."""
    weights = [(name, getattr(fractions, name)) for name in among]
    total = sum(w for _, w in weights)
    u = split_position(sha256, seed)
    edge = 0.0
    for name, weight in weights:
        edge += weight / total
        if u < edge:
            return name
    return weights[-1][0]


def data_version(records: Iterable[tuple[str, str, str, str]]) -> str:
    """Content hash over sorted (path relative to raw_dir, label, split, sha256)."""
    digest = hashlib.sha256()
    for record in sorted(records):
        digest.update(("\t".join(record) + "\n").encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Layout of a tree of files


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def walk_tree(root: Path) -> tuple[list[str], list[str]]:
    """Relative posix paths of all files and all folders under root."""
    files, dirs = [], []
    for here, subdirs, names in os.walk(root):
        rel_here = Path(here).relative_to(root)
        dirs.extend((rel_here / d).as_posix() for d in subdirs)
        files.extend((rel_here / n).as_posix() for n in names)
    return sorted(files), sorted(dirs)


@dataclass
class Planned:
    rel: str
    label: str
    given_split: str | None
    hidden: bool


def plan_layout(files: list[str], dirs: list[str]) -> tuple[str, list[Planned], dict[str, int], list[str]]:
    """Read labels (and given splits) off a tree: `<class>/...` or `<split>/<class>/...`.

    Returns (layout, planned files, class folder -> visible file count, ignored paths). Files
    outside class folders (e.g. a LICENSE.txt at the top) and hidden top-level folders are ignored.
    """
    top_dirs = {p.split("/")[0] for p in dirs} | {p.split("/")[0] for p in files if "/" in p}
    split_layout = any(d.lower() in SPLIT_ALIASES for d in top_dirs)
    depth = 2 if split_layout else 1  # path components before the file that name its class folder
    folders: dict[str, int] = {}
    for d in dirs:
        parts = d.split("/")
        if len(parts) == depth and _usable_folder(parts, split_layout):
            folders.setdefault(d, 0)
    planned, ignored = [], []
    for rel in files:
        parts = rel.split("/")
        if len(parts) <= depth or not _usable_folder(parts[:depth], split_layout):
            ignored.append(rel)
            continue
        hidden = any(is_hidden(p) for p in parts[depth:])
        folder = "/".join(parts[:depth])
        folders[folder] = folders.get(folder, 0) + (0 if hidden else 1)
        split = SPLIT_ALIASES[parts[0].lower()] if split_layout else None
        planned.append(Planned(rel, parts[depth - 1], split, hidden))
    return ("split_folders" if split_layout else "class_folders"), planned, folders, ignored


def _usable_folder(parts: list[str], split_layout: bool) -> bool:
    if any(is_hidden(p) for p in parts):
        return False
    return not split_layout or parts[0].lower() in SPLIT_ALIASES


# --------------------------------------------------------------------------------------------
# Safe archive extraction


def archive_kind(name: str) -> str | None:
    lowered = name.lower().split("?")[0]
    if lowered.endswith(".zip"):
        return "zip"
    return "tar" if lowered.endswith(ARCHIVE_SUFFIXES) else None


def extract_archive(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    """Unpack a zip or tar archive into dest, refusing anything that could escape it or explode."""
    dest.mkdir(parents=True, exist_ok=True)
    if archive_kind(archive.name) == "zip" or zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, max_bytes, max_members)
    else:
        _extract_tar(archive, dest, max_bytes, max_members)


def _limit_error(archive: Path, what: str, value: int, limit: int, key: str) -> IngestError:
    return IngestError(f"{archive.name}: {what} {value:,} exceeds ingest.{key}={limit:,} "
                       "(possible decompression bomb); raise the limit in params.yaml if the archive is trusted")


def _extract_tar(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    def refuse_unsafe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        if member.issym() or member.islnk():
            raise IngestError(f"{archive.name}: member {member.name!r} is a link; links are refused in image archives")
        if member.name.startswith(("/", "\\")) or ":" in member.name.split("/")[0]:
            raise IngestError(f"{archive.name}: unsafe member {member.name!r}: absolute path")
        try:
            return tarfile.data_filter(member, path)  # absolute paths, '..', devices, odd modes
        except tarfile.FilterError as exc:
            raise IngestError(f"{archive.name}: unsafe member {member.name!r}: {exc}") from None

    try:
        with tarfile.open(archive, "r:*") as tar:
            count = total = 0
            for member in tar:  # streamed, so a bomb is stopped before it is all read
                count += 1
                total += member.size if member.isfile() else 0
                if count > max_members:
                    raise _limit_error(archive, "member count", count, max_members, "max_files")
                if total > max_bytes:
                    raise _limit_error(archive, "unpacked size", total, max_bytes, "max_bytes")
                refuse_unsafe(member, str(dest))  # check everything before writing anything
            tar.extractall(dest, filter=refuse_unsafe)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise IngestError(f"{archive.name}: not a readable archive: {exc}") from None


def _zip_target(dest: Path, archive: Path, name: str) -> Path:
    clean = name.replace("\\", "/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if clean.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise IngestError(f"{archive.name}: unsafe member {name!r}: an absolute path or '..' would write "
                          "outside the target")
    return dest.joinpath(*parts) if parts else dest


def _extract_zip(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise _limit_error(archive, "member count", len(infos), max_members, "max_files")
            declared = sum(i.file_size for i in infos)
            if declared > max_bytes:
                raise _limit_error(archive, "unpacked size", declared, max_bytes, "max_bytes")
            targets = [_zip_target(dest, archive, i.filename) for i in infos]  # check all before writing
            for info in infos:
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise IngestError(f"{archive.name}: member {info.filename!r} is a link; "
                                      "links are refused in image archives")
            written = 0
            for info, target in zip(infos, targets):
                written = _write_zip_member(zf, info, target, archive, written, max_bytes)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise IngestError(f"{archive.name}: not a readable archive: {exc}") from None


def _write_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path,
                      written: int, max_bytes: int) -> int:
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return written
    target.parent.mkdir(parents=True, exist_ok=True)
    member_bytes = 0
    with zf.open(info) as src, open(target, "xb") as dst:  # 'x': a repeated name cannot overwrite
        while chunk := src.read(CHUNK):
            member_bytes += len(chunk)
            written += len(chunk)
            # Declared sizes can lie: count what is actually inflated.
            if member_bytes > info.file_size or written > max_bytes:
                raise _limit_error(archive, "unpacked size", written, max_bytes, "max_bytes")
            dst.write(chunk)
    mtime = time.mktime(info.date_time + (0, 0, -1))
    os.utime(target, (mtime, mtime))  # stable mtimes keep the ingest cache valid across extractions
    return written


def unwrap_single_top(root: Path) -> tuple[Path, list[str]]:
    """An archive's lone top folder (e.g. flower_photos/) becomes the root; stray top files are ignored."""
    entries = [p for p in root.iterdir() if not is_hidden(p.name)]
    dirs = [p for p in entries if p.is_dir()]
    if len(dirs) == 1 and dirs[0].name.lower() not in SPLIT_ALIASES:
        strays = [p.name for p in entries if not p.is_dir()]
        return dirs[0], strays
    return root, []


# --------------------------------------------------------------------------------------------
# Sources


def is_remote(location: str) -> bool:
    scheme = location.split("://", 1)[0] if "://" in location else ""
    return bool(scheme) and scheme != "file"


def _strip_file_scheme(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def _remote_version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation", "LastModified", "Last-Modified", "last_modified", "mtime",
                "updated", "created"):
        if info.get(key):
            return f"{key}={info[key]}"
    return ""


def _check_no_overlap(source: Path, raw_dir: Path) -> None:
    """Refuse a source inside raw_dir (it would be replaced) or raw_dir inside a source folder."""
    src, raw = source.resolve(), raw_dir.resolve()
    if src == raw or raw in src.parents or (source.is_dir() and src in raw.parents):
        raise IngestError(f"source {source} and raw_dir {raw_dir} overlap: ingest would write into its own source")


def local_source_path(source: str) -> Path | None:
    """The source as an absolute local path (relative ones against cwd), or None for a URL."""
    source = _strip_file_scheme(source)
    if is_remote(source):
        return None
    path = Path(source).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def collect_source(config: IngestConfig, dest: Path, staging: Path, downloads: Path, raw_dir: Path) -> Listing:
    """Bring the source's files into dest (the new raw_dir) and list them."""
    path = local_source_path(config.source)
    if path is None:
        return _collect_remote(config.source, config, dest, staging, downloads)
    if not path.exists():
        raise IngestError(f"source {config.source!r} not found (looked at {path})")
    _check_no_overlap(path, raw_dir)
    if path.is_dir():
        return _collect_folder(path, dest)
    if archive_kind(path.name):
        return _collect_archive(path, str(path), config, dest, staging)
    if path.name.lower().endswith(TABLE_SUFFIXES):
        return _collect_table(str(path), dest, raw_dir)
    raise IngestError(f"source {path}: not a folder, archive ({', '.join(ARCHIVE_SUFFIXES)}) or table (.csv/.parquet)")


def _collect_folder(root: Path, dest: Path) -> Listing:
    files, dirs = walk_tree(root)
    layout, planned, folders, ignored = plan_layout(files, dirs)
    entries = []
    for p in planned:
        st = (root / p.rel).stat()
        entries.append(Entry(p.rel, p.label, p.given_split, str(root / p.rel), str(root / p.rel),
                             p.hidden, size=st.st_size, version=str(st.st_mtime_ns)))
    _materialise(entries, dest)
    return Listing("folder", layout, entries, folders, ignored)


def _collect_archive(archive: Path, origin: str, config: IngestConfig, dest: Path, staging: Path) -> Listing:
    extract_root = staging / "extract"
    print(f"ingest: extracting {archive.name}", file=sys.stderr)
    extract_archive(archive, extract_root, config.max_bytes, config.max_files)
    root, strays = unwrap_single_top(extract_root)
    files, dirs = walk_tree(root)
    layout, planned, folders, ignored = plan_layout(files, dirs)
    entries = []
    for p in planned:
        src = root / p.rel
        st = src.stat()
        member = src.relative_to(extract_root).as_posix()
        entries.append(Entry(p.rel, p.label, p.given_split, f"{origin}!{member}", None, p.hidden,
                             size=st.st_size, version=str(st.st_mtime_ns)))
        (dest / p.rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest / p.rel)  # our own extracted copy: moving it costs nothing
    return Listing("archive", layout, entries, folders, sorted(strays + ignored))


def _collect_remote(url: str, config: IngestConfig, dest: Path, staging: Path, downloads: Path) -> Listing:
    import fsspec

    if archive_kind(url):
        local = download(url, downloads, config.max_bytes)
        return _collect_archive(local, url, config, dest, staging)
    if url.lower().split("?")[0].endswith(TABLE_SUFFIXES):
        return _collect_table(url, dest, None)
    fs, root = fsspec.core.url_to_fs(url)
    if url.startswith(("http://", "https://")) or not fs.isdir(root):
        raise IngestError(f"source {url}: a URL must name an archive, a CSV/Parquet table, or a bucket folder")
    return _collect_remote_folder(fs, root, url, dest)


def _collect_remote_folder(fs: Any, root: str, url: str, dest: Path) -> Listing:
    root = root.rstrip("/")
    found = fs.find(root, withdirs=True, detail=True)
    files = {posixpath.relpath(name, root): info for name, info in found.items() if info["type"] == "file"}
    dirs = [posixpath.relpath(name, root) for name, info in found.items() if info["type"] == "directory"]
    layout, planned, folders, ignored = plan_layout(sorted(files), sorted(d for d in dirs if d != "."))
    entries = []
    for p in planned:
        info = files[p.rel]
        location = f"{url.rstrip('/')}/{p.rel}"  # as the user spelled the source
        entries.append(Entry(p.rel, p.label, p.given_split, location, location, p.hidden,
                             size=int(info.get("size") or 0), version=_remote_version(info)))
    _materialise(entries, dest)
    return Listing("remote-folder", layout, entries, folders, ignored)


def download(url: str, downloads: Path, max_bytes: int) -> Path:
    """Fetch a remote archive once; reuse it while the server reports the same size and version."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot reach {url}: {exc}") from None
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + posixpath.basename(path.split("?")[0])
    target, meta_path = downloads / name, downloads / f"{name}.json"
    meta = {"url": url, "size": info.get("size"), "version": _remote_version(info)}
    reusable = bool(meta["size"] and meta["version"]) and target.exists() and meta_path.exists()
    if reusable and files.read_json(meta_path) == meta:
        print(f"ingest: reusing the download of {url}", file=sys.stderr)
        return target
    size = int(info.get("size") or 0)
    if size > max_bytes:
        raise IngestError(f"{url}: size {size:,} exceeds ingest.max_bytes={max_bytes:,}")
    try:
        with fs.open(path, "rb") as src, files.atomic_file(target, "wb") as dst, \
                tqdm(total=size or None, unit="B", unit_scale=True, desc="download", disable=None) as bar:
            fetched = 0
            while chunk := src.read(CHUNK):
                fetched += len(chunk)
                if fetched > max_bytes:
                    raise IngestError(f"{url}: download exceeds ingest.max_bytes={max_bytes:,}")
                dst.write(chunk)
                bar.update(len(chunk))
    except IngestError:
        raise
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot download {url}: {exc}") from None
    files.write_json(meta_path, meta)
    return target


def _read_table(location: str) -> Any:
    import fsspec
    import pandas as pd

    try:
        with fsspec.open(location, "rb") as fh:
            if location.lower().split("?")[0].endswith(".csv"):
                return pd.read_csv(fh, dtype=str, keep_default_na=False)
            return pd.read_parquet(fh).fillna("").astype(str)
    except FileNotFoundError:
        raise IngestError(f"table {location} not found") from None
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot read table {location}: {exc}") from None


def _collect_table(location: str, dest: Path, raw_dir: Path | None) -> Listing:
    """Rows of (path or uri, label[, split]); relative paths are read against the table's folder."""
    table = _read_table(location)
    path_col = next((c for c in ("path", "uri", "url", "file") if c in table.columns), None)
    if path_col is None or "label" not in table.columns:
        raise IngestError(f"table {location}: needs a 'path' (or 'uri') column and a 'label' column, "
                          f"has {list(table.columns)}")
    base = posixpath.dirname(location) if is_remote(location) else str(Path(location).parent)
    entries, seen = [], set()
    for i, row in enumerate(table.to_dict("records")):
        raw_loc, label = str(row[path_col]).strip(), str(row["label"]).strip()
        if not raw_loc or not label:
            raise IngestError(f"table {location}, row {i + 2}: empty path or label")
        split = _table_split(row.get("split", ""), location, i)
        full = _resolve_location(raw_loc, base)
        if full in seen:
            raise IngestError(f"table {location}, row {i + 2}: {raw_loc} is listed more than once")
        seen.add(full)
        if raw_dir is not None and not is_remote(full):
            _check_no_overlap(Path(full), raw_dir)
        entries.append(_table_entry(raw_loc, full, label, split))
    _name_external_entries(entries)
    _materialise(entries, dest)
    return Listing("table", "table", entries)


def _table_split(value: Any, location: str, i: int) -> str | None:
    text = str(value or "").strip().lower()
    if not text:
        return None
    if text not in SPLIT_ALIASES:
        raise IngestError(f"table {location}, row {i + 2}: split {value!r} is not one of train, val, test")
    return SPLIT_ALIASES[text]


def _resolve_location(raw_loc: str, base: str) -> str:
    raw_loc = _strip_file_scheme(raw_loc)
    if is_remote(raw_loc) or os.path.isabs(raw_loc):
        return raw_loc
    if is_remote(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, raw_loc))}"
    return os.path.normpath(os.path.join(base, raw_loc))


def _table_entry(raw_loc: str, full: str, label: str, split: str | None) -> Entry:
    rel = posixpath.normpath(raw_loc.replace("\\", "/"))
    inside = not (is_remote(raw_loc) or os.path.isabs(raw_loc) or rel.startswith("../") or rel == "..")
    entry = Entry(rel if inside else "", label, split, full, full, is_hidden(posixpath.basename(rel)))
    stamp = _stamp(full)
    if stamp is None:
        entry.missing, entry.fetch = True, None
    else:
        entry.size, entry.version = stamp
    return entry


def _name_external_entries(entries: list[Entry]) -> None:
    """Files from outside the table's folder go to <label>/<name>, made unique by a hash if needed."""
    taken = Counter(e.rel for e in entries if e.rel)
    wanted = Counter(f"{e.label}/{posixpath.basename(e.origin)}" for e in entries if not e.rel)
    for e in entries:
        if e.rel:
            continue
        name = f"{e.label}/{posixpath.basename(e.origin)}"
        if taken[name] or wanted[name] > 1:
            stem, ext = posixpath.splitext(name)
            name = f"{stem}-{hashlib.sha256(e.origin.encode()).hexdigest()[:8]}{ext}"
        e.rel = name


def _stamp(location: str) -> tuple[int, str] | None:
    """(size, version) of a file, or None when it does not exist."""
    if is_remote(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        return int(info.get("size") or 0), _remote_version(info)
    try:
        st = os.stat(location)
    except FileNotFoundError:
        return None
    return (st.st_size, str(st.st_mtime_ns)) if stat.S_ISREG(st.st_mode) else None


def _materialise(entries: list[Entry], dest: Path) -> None:
    """Copy every fetchable entry to dest/rel (source files are only read)."""
    todo = [e for e in entries if e.fetch and not e.missing]
    for e in todo:
        (dest / e.rel).parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound: threads suffice, remote reads overlap
        jobs = pool.map(lambda e: _copy_one(e.fetch, dest / e.rel), todo)
        for _ in tqdm(jobs, total=len(todo), desc="copy", unit="file", disable=None):
            pass


def _copy_one(location: str, target: Path) -> None:
    if is_remote(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        try:
            fs.get_file(path, str(target))
        except OSError as exc:
            if exc.errno in errors.WRITE_FAILURES:  # our disk, not the source: cli_errors names the path
                raise
            raise IngestError(f"cannot fetch {location}: {exc}") from None
    else:
        shutil.copy2(location, target)


# --------------------------------------------------------------------------------------------
# Cache of per-file facts


class FactsCache:
    """Facts of files keyed by (origin, size, version); valid only for the same Pillow and max_pixels."""

    def __init__(self, path: Path, max_pixels: int) -> None:
        self.path = path
        self.signature = {"pillow": PIL.__version__, "max_pixels": max_pixels, "schema": 1}
        self.files: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                stored = files.read_json(path)
            except (OSError, json.JSONDecodeError):
                stored = {}  # a damaged cache only costs a recompute
            if stored.get("signature") == self.signature:
                self.files = stored.get("files", {})

    def get(self, entry: Entry) -> dict[str, Any] | None:
        hit = self.files.get(entry.origin)
        if hit and entry.version and hit["size"] == entry.size and hit["version"] == entry.version:
            return hit["facts"]
        return None

    def save(self, entries: list[Entry], facts: dict[str, dict[str, Any]]) -> None:
        """Keep only the current files, so the cache never outgrows the source."""
        known = {e.origin: {"size": e.size, "version": e.version, "facts": facts[e.origin]}
                 for e in entries if e.version and e.origin in facts}
        files.write_json(self.path, {"signature": self.signature, "files": known})


def resolve_workers(workers: int) -> int:
    return workers or os.cpu_count() or 1


def inspect_entries(entries: list[Entry], root: Path, cache: FactsCache, workers: int,
                    max_pixels: int) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Facts for every present entry: from the cache when unchanged, else computed in a pool.

    Returns (facts by origin, files computed, processes used).
    """
    facts: dict[str, dict[str, Any]] = {}
    todo = []
    for e in entries:
        if e.missing:
            continue
        cached = cache.get(e)
        if cached is not None:
            facts[e.origin] = cached
        else:
            todo.append(e)
    jobs = [(str(root / e.rel), max_pixels) for e in todo]
    used = min(workers, len(jobs)) if len(jobs) >= MIN_FILES_FOR_POOL else 1
    bar = dict(total=len(jobs), desc="hash+decode", unit="file", disable=None)
    if used > 1:
        with ProcessPoolExecutor(max_workers=used) as pool:
            results = list(tqdm(pool.map(_inspect_star, jobs, chunksize=max(1, len(jobs) // (used * 16))), **bar))
    else:
        results = [inspect_file(*job) for job in tqdm(jobs, **bar)]
    facts.update((e.origin, r) for e, r in zip(todo, results))
    return facts, len(jobs), used if jobs else 0


# --------------------------------------------------------------------------------------------
# Rows, report, entry point


def build_rows(entries: list[Entry], facts: dict[str, dict[str, Any]], raw_dir: Path, seed: int,
               fractions: SplitFractions) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifest rows (sorted by path) with splits; notes say which splits were carved from train."""
    given = {e.given_split for e in entries if e.given_split}
    missing = [s for s in SPLITS if s not in given]
    notes = []
    carve = bool(given) and "train" in given and bool(missing)
    if carve:
        notes.append(f"the source has no {'/'.join(missing)} split: carved from train by content hash "
                     f"({', '.join(f'{s}={getattr(fractions, s):g}' for s in ['train', *missing])}, renormalised)")
    elif given and missing:
        notes.append(f"the source has no train split; {'/'.join(missing)} left empty")
    rows = []
    for e in entries:
        f = facts.get(e.origin) or {"sha256": "", "bytes": 0, "format": "", "mode": "", "width": 0, "height": 0,
                                    "error": f"source file not found: {e.origin}"}
        error = "hidden or system file (e.g. .DS_Store), not an image" if e.hidden else f["error"]
        key = f["sha256"] or hashlib.sha256(e.origin.encode()).hexdigest()
        split = e.given_split
        if split is None:
            split = assign_split(key, seed, fractions)
        elif split == "train" and carve:
            split = assign_split(key, seed, fractions, among=["train", *missing])
        rows.append({"path": (raw_dir / e.rel).as_posix(), "label": e.label, "split": split, "sha256": f["sha256"],
                     "bytes": f["bytes"], "width": f["width"], "height": f["height"], "format": f["format"],
                     "mode": f["mode"], "source": e.origin, "error": error, "_rel": e.rel})
    rows.sort(key=lambda r: r["path"])
    return rows, notes


def count_images(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for r in rows:
        if not r["error"]:
            counts[r["split"]][r["label"]] = counts[r["split"]].get(r["label"], 0) + 1
    return {s: dict(sorted(c.items())) for s, c in counts.items()}


def _write_manifest(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    with files.atomic_file(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def run_ingest(config: IngestConfig, seed: int, raw_dir: str | Path, manifest_path: str | Path,
               report_path: str | Path, max_pixels: int) -> IngestResult:
    """Copy the source into raw_dir, inspect every file, write the manifest and the report."""
    started = time.perf_counter()
    raw_dir, manifest_path, report_path = Path(raw_dir), Path(manifest_path), Path(report_path)
    local_source = local_source_path(config.source)
    if local_source is not None:
        _check_no_overlap(local_source, raw_dir)  # before anything is written next to raw_dir
    cache_dir = raw_dir.parent / CACHE_DIRNAME  # beside, not inside, the DVC-tracked raw_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    workers = resolve_workers(config.workers)
    with FileLock(cache_dir / "lock"):
        for leftover in cache_dir.glob("staging-*"):  # a killed run's: we hold the lock, so none is in use
            shutil.rmtree(leftover, ignore_errors=True)
        cache = FactsCache(cache_dir / "files.json", max_pixels)
        with files.atomic_dir(raw_dir) as new_raw, \
                tempfile.TemporaryDirectory(dir=cache_dir, prefix="staging-") as staging:
            listing = collect_source(config, new_raw, Path(staging), cache_dir / "downloads", raw_dir)
            if not listing.entries:
                raise IngestError(f"source {config.source!r}: no files in class folders "
                                  "(expected <class>/<image> or <split>/<class>/<image>)")
            facts, computed, used = inspect_entries(listing.entries, new_raw, cache, workers, max_pixels)
            rows, notes = build_rows(listing.entries, facts, raw_dir, seed, config.split)
        _write_manifest(rows, manifest_path)
        cache.save(listing.entries, facts)
    seconds = time.perf_counter() - started
    result = IngestResult(
        raw_dir=raw_dir, manifest_path=manifest_path, report_path=report_path, files=len(rows),
        images=sum(1 for r in rows if not r["error"]), unreadable=sum(1 for r in rows if r["error"]),
        bytes=sum(int(r["bytes"]) for r in rows), counts=count_images(rows),
        data_version=data_version((r["_rel"], r["label"], r["split"], r["sha256"]) for r in rows),
        computed=computed, cached=len(facts) - computed, workers=used, seconds=round(seconds, 3), notes=notes)
    files.write_json(report_path, _report(result, config, listing, seed, max_pixels))
    return result


def _report(result: IngestResult, config: IngestConfig, listing: Listing, seed: int, max_pixels: int) -> dict[str, Any]:
    return {
        "source": config.source, "source_kind": listing.kind, "layout": listing.layout,
        "raw_dir": result.raw_dir.as_posix(), "manifest": result.manifest_path.as_posix(),
        "data_version": result.data_version, "files": result.files, "images": result.images,
        "unreadable": result.unreadable, "bytes": result.bytes, "counts": result.counts,
        "class_folders": dict(sorted(listing.class_folders.items())),
        "ignored": listing.ignored[:200], "ignored_count": len(listing.ignored),
        "notes": result.notes, "seed": seed, "split_fractions": config.split.model_dump(),
        "max_pixels": max_pixels, "seconds": result.seconds, "workers": result.workers,
        "cache": {"computed": result.computed, "reused": result.cached},
    }


@errors.cli_errors("ingest")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (sections project, ingest, validate)")
    parser.add_argument("--raw-dir", default="data/raw", help="where the source's files are copied")
    parser.add_argument("--manifest", default="data/manifest.csv", help="one row per file")
    parser.add_argument("--report", default="reports/ingest.json", help="counts, data version, timings")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        files.ensure_writable(args.raw_dir, args.manifest, args.report)  # before copying, not after
        result = run_ingest(params.ingest, params.project.seed, args.raw_dir, args.manifest, args.report,
                            max_pixels=params.validate.max_pixels)
    except (ParamsError, IngestError) as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    per_split = ", ".join(f"{s} {sum(c.values())}" for s, c in result.counts.items())
    print(f"ingest: {result.files} files ({result.images} images, {result.unreadable} unreadable; {per_split}) "
          f"-> {result.manifest_path}; data version {result.data_version[:12]}; "
          f"{result.computed} inspected, {result.cached} from cache, {result.seconds:.1f}s")
    for note in result.notes:
        print(f"ingest: note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
