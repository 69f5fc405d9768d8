"""Bringing a source's bytes in within the caps: copies into raw_dir, and downloads of archive URLs.

  - `materialise`: copies entries into the new raw_dir, opening each source file with
    O_NOFOLLOW|O_NONBLOCK and checking it is the file that was listed (same device and inode), and
    each target only after `confine.inside` resolved it within raw_dir; `ingest.max_files` and
    `ingest.max_bytes` hold for every kind (bytes are counted as they are copied, so sizes that lie
    do not help);
  - `download`: an archive URL fetched once under components.ingestion.urls' policy, within ingest.max_bytes,
    and reused only while its kept bytes still hash to what was downloaded;
  - remote files are versioned by the sha256 of the bytes downloaded, never by the server's ETag or
    size: the facts cache reuses facts only for the same bytes.
An entry that cannot be copied safely is refused (reported by name with the reason), never dropped silently.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from components.core import errors, files
from components.core.credentials import redact
from components.ingestion.confine import (
    Context,
    Entry,
    IngestError,
    Refused,
    check_link_count,
    file_identity,
    file_version,
    inside,
)
from components.ingestion.layout import safe_relative
from components.ingestion.url_fetch import open_remote, remote_info
from components.ingestion.urls import UrlPolicy, URLRefused, is_remote

CHUNK = 1 << 20
COPY_THREADS = 8
T, R = TypeVar("T"), TypeVar("R")


class ByteBudget:
    """ingest.max_bytes over every byte a source delivers, across copying threads."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self._lock = limit, 0, threading.Lock()

    def spend(self, n: int) -> None:
        with self._lock:
            self.used += n
            if self.used > self.limit:
                raise IngestError(
                    f"the source delivers more than ingest.max_bytes={self.limit:,} bytes; raise the "
                    "limit in params.yaml if the source is trusted"
                )


def _open_target(dest: Path, rel: str) -> int:
    target = inside(dest, rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.resolve().is_relative_to(dest.resolve()):
        raise Refused("its target folder would lie outside data/raw")
    # O_EXCL: two entries can never write one file; O_NOFOLLOW: never through a link.
    return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)


def _copy_stream(
    read: Callable[[int], bytes], fd: int, target: Path, budget: ByteBudget, digest: Any | None = None
) -> int:
    """Copy until read() is exhausted (hashing into digest); a failed write names the target (disk full: which file)."""
    copied = 0
    try:
        while chunk := read(CHUNK):
            budget.spend(len(chunk))
            if digest is not None:
                digest.update(chunk)
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except OSError as exc:
                    raise OSError(exc.errno, exc.strerror, str(target)) from None
            copied += len(chunk)
    finally:
        os.close(fd)
    return copied


def _copy_local(entry: Entry, dest: Path, budget: ByteBudget, allow_hard_links: bool) -> None:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        src = os.open(entry.fetch, flags)
    except OSError as exc:
        raise Refused(f"cannot open: {exc.strerror or type(exc).__name__}") from None
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or (entry.identity is not None and file_identity(st) != entry.identity):
            raise Refused("the file changed while it was being ingested")
        check_link_count(st, allow_hard_links)  # again: a link made after listing
        out = _open_target(dest, entry.rel)
        with os.fdopen(src, "rb", closefd=False) as fh:
            entry.size = _copy_stream(fh.read, out, dest / entry.rel, budget)
        after = os.fstat(src)
        # The facts cache keys on this: a file swapped or rewritten since the last run is inspected again.
        entry.version = file_version(st) if file_version(after) == file_version(st) else ""
        os.utime(dest / entry.rel, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(src)


def _copy_remote(entry: Entry, dest: Path, policy: UrlPolicy, budget: ByteBudget) -> None:
    inside(dest, entry.rel)  # refused before any request
    digest = hashlib.sha256()
    try:
        with open_remote(entry.fetch or "", policy) as src:  # opened first: a refused URL leaves no empty file
            entry.size = _copy_stream(src.read, _open_target(dest, entry.rel), dest / entry.rel, budget, digest)
        # The facts cache keys on the bytes we hold, not on what the server says (ETag, size): new
        # bytes under an old ETag are inspected again.
        entry.version = f"sha256={digest.hexdigest()}"
    except URLRefused as exc:
        raise Refused(str(exc)) from None
    except OSError as exc:
        if exc.errno in errors.WRITE_FAILURES:  # our disk, not the source: cli_errors names the path
            raise
        raise IngestError(f"cannot fetch {redact(entry.fetch or '')}: {exc}") from None


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """`pool.map(fn, items)` (results in order, the first error raised) with at most `window` calls in flight.

    Executor.map submits every call at once: one Future (a lock and a condition, ~2 KB) per file, held until
    the pass ends, memory that grows with the source (issue 24).
    """
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            if len(pending) >= window:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def materialise(entries: list[Entry], ctx: Context) -> list[Entry]:
    """Copy every fetchable entry to dest/rel within the caps; returns the entries kept (others refused)."""
    config = ctx.config
    if len(entries) > config.max_files:
        raise IngestError(
            f"the source lists {len(entries):,} files, over ingest.max_files={config.max_files:,}; "
            "raise the limit in params.yaml if the source is trusted"
        )
    todo = [e for e in entries if e.fetch and not e.missing]
    declared = sum(e.size for e in todo)
    if declared > config.max_bytes:
        raise IngestError(
            f"the source's files add up to {declared:,} bytes, over ingest.max_bytes="
            f"{config.max_bytes:,}; raise the limit in params.yaml if the source is trusted"
        )
    budget, policy = ByteBudget(config.max_bytes), ctx.policy

    def copy(entry: Entry) -> str | None:
        try:
            if is_remote(entry.fetch or ""):
                _copy_remote(entry, ctx.dest, policy, budget)
            else:
                _copy_local(entry, ctx.dest, budget, config.allow_hard_links)
        except Refused as exc:
            return str(exc)
        entry.fetch, entry.identity = None, None  # in place now: nothing more to hold per file
        return None

    refused: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:  # I/O bound: threads suffice, remote reads overlap
        for entry, reason in tqdm(
            zip(todo, bounded_map(pool, copy, todo, 4 * COPY_THREADS)),
            total=len(todo),
            desc="copy",
            unit="file",
            disable=None,
        ):
            if reason:
                refused[id(entry)] = reason
                ctx.refuse(entry.origin, reason)
    return [e for e in entries if id(e) not in refused]


def download(url: str, ctx: Context) -> Path:
    """Fetch a remote archive once; reuse it while the server reports the same size and version."""
    policy, max_bytes = ctx.policy, ctx.config.max_bytes
    try:
        info = remote_info(url, policy)
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot reach {redact(url)}: {exc}") from None
    if info is None:
        raise IngestError(f"cannot reach {redact(url)}: not found")
    base = posixpath.basename(url.split("?")[0].split("#")[0])
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + (base if safe_relative(base) else "archive")
    target, meta_path = ctx.downloads / name, ctx.downloads / f"{name}.json"
    meta = {"url": redact(url), "size": info["size"], "version": info["version"]}
    if meta["size"] and meta["version"] and _verified_download(target, meta_path, meta):
        print(f"ingest: reusing the download of {redact(url)}", file=sys.stderr)
        return target
    if info["size"] > max_bytes:
        raise IngestError(f"{redact(url)}: size {info['size']:,} exceeds ingest.max_bytes={max_bytes:,}")
    budget, digest = ByteBudget(max_bytes), hashlib.sha256()
    try:
        with (
            open_remote(url, policy) as src,
            files.atomic_file(target, "wb") as dst,
            tqdm(total=info["size"] or None, unit="B", unit_scale=True, desc="download", disable=None) as bar,
        ):
            while chunk := src.read(CHUNK):
                budget.spend(len(chunk))
                digest.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))
    except IngestError:
        raise
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot download {redact(url)}: {exc}") from None
    files.write_json(meta_path, {**meta, "sha256": digest.hexdigest()})
    return target


def _verified_download(target: Path, meta_path: Path, meta: dict[str, Any]) -> bool:
    """Whether an earlier download may be reused: the server still reports its size and version, and
    the kept file still holds the bytes (sha256) that were downloaded complete."""
    try:
        kept = files.read_json(meta_path)
        if not isinstance(kept, dict) or {k: kept.get(k) for k in meta} != meta or not kept.get("sha256"):
            return False
        size, digest = 0, hashlib.sha256()
        with open(target, "rb") as fh:
            while chunk := fh.read(CHUNK):
                size += len(chunk)
                digest.update(chunk)
    except (OSError, ValueError):
        return False
    return size == meta["size"] and digest.hexdigest() == kept["sha256"]
