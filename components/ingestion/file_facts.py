"""Facts about every ingested file: sha256, size and a full decode, computed in a process pool and cached.

Each copied file is hashed and, in an allowed format (`validate.allowed_formats`), fully decoded
through the guarded loader (components/ingestion/images.py). Facts are cached beside raw_dir by the file's
origin and version (components/ingestion/confine.py's `file_version`, or the sha256 of downloaded bytes), so a
rerun on an unchanged source recomputes nothing; the cache holds only for the same Pillow and limits.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import PIL

from components.core import files
from components.core.progress import progress
from components.ingestion.confine import Entry, IngestError
from components.ingestion.images import ImageLimits, UnusableImage, inspect_image

CHUNK = 1 << 20
# Below this many files a process pool costs more to start than it saves.
MIN_FILES_FOR_POOL = 64


# --------------------------------------------------------------------------------------------
# Per-file facts (runs in worker processes)


def blank_facts(error: str = "") -> dict[str, Any]:
    """A file's facts before anything is known of its bytes; `error` says why it is unusable."""
    return {"sha256": "", "bytes": 0, "format": "", "mode": "", "width": 0, "height": 0, "error": error}


def inspect_file(path: str, limits: ImageLimits) -> dict[str, Any]:
    """sha256, size and a full decode (ingestion.images) of one copied file; `error` says why it is unusable."""
    digest, size, kept = hashlib.sha256(), 0, bytearray()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise IngestError(f"{path}: not a regular file")  # raw_dir is ours: this is a bug, not bad data
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if size <= limits.max_bytes:
                kept += chunk
    facts = {**blank_facts(), "sha256": digest.hexdigest(), "bytes": size}
    if size == 0:
        facts["error"] = "empty file (0 bytes)"
    elif size > limits.max_bytes:
        facts["error"] = f"{size:,} bytes exceeds validate.max_image_bytes={limits.max_bytes:,}"
    else:
        try:
            found = inspect_image(bytes(kept), limits)
        except UnusableImage as exc:
            facts["error"] = exc.reason
        else:
            facts.update(format=found.format, mode=found.mode, width=found.width, height=found.height)
            if found.note:
                facts["note"] = found.note  # usable, but its EXIF orientation could not be applied
    return facts


def _inspect_star(args: tuple[str, ImageLimits]) -> dict[str, Any]:
    return inspect_file(*args)


# --------------------------------------------------------------------------------------------
# Cache of per-file facts


class FactsCache:
    """Facts of files keyed by (origin, size, version); valid only for the same Pillow and image limits.

    A local file's version is its size, mtime, ctime, inode and device (sources.file_version): a file
    swapped in with the same size and a restored mtime still gets a new ctime, so it is inspected again.
    """

    def __init__(self, path: Path, limits: ImageLimits) -> None:
        self.path = path
        self.signature = {
            "pillow": PIL.__version__,
            "max_pixels": limits.max_pixels,
            "max_image_bytes": limits.max_bytes,
            "formats": list(limits.formats or ()),
            "schema": 4,  # 3: only allowed formats decoded; embedded images checked. 4: upright (EXIF) sizes
        }
        self.files: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                stored = files.read_json(path)
            except (OSError, json.JSONDecodeError):
                stored = {}  # a damaged cache only costs a recompute
            if isinstance(stored, dict) and stored.get("signature") == self.signature:
                self.files = stored.get("files", {})

    def get(self, entry: Entry) -> dict[str, Any] | None:
        hit = self.files.get(entry.origin)
        if hit and entry.version and hit["size"] == entry.size and hit["version"] == entry.version:
            return hit["facts"]
        return None

    def save(self, entries: list[Entry], facts: dict[str, dict[str, Any]]) -> None:
        """Keep only the current files, so the cache never outgrows the source."""
        known = {
            e.origin: {"size": e.size, "version": e.version, "facts": facts[e.origin]}
            for e in entries
            if e.version and e.origin in facts
        }
        files.write_json(self.path, {"signature": self.signature, "files": known})


def inspect_entries(
    entries: list[Entry], root: Path, cache: FactsCache, workers: int, limits: ImageLimits
) -> tuple[dict[str, dict[str, Any]], int, int]:
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
    jobs = [(str(root / e.rel), limits) for e in todo]
    used = min(workers, len(jobs)) if len(jobs) >= MIN_FILES_FOR_POOL else 1
    bar = dict(total=len(jobs), desc="ingest: hash+decode", unit="file")
    if used > 1:
        with ProcessPoolExecutor(max_workers=used) as pool:
            chunks = max(1, len(jobs) // (used * 16))
            results = list(progress(pool.map(_inspect_star, jobs, chunksize=chunks), **bar))
    else:
        results = [inspect_file(*job) for job in progress(jobs, **bar)]
    facts.update((e.origin, r) for e, r in zip(todo, results))
    return facts, len(jobs), used if jobs else 0
