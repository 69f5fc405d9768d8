"""Facts about every ingested file: sha256, size and a full decode, computed in a process pool and cached.

Each copied file is hashed and, in an allowed format (`validate.allowed_formats`), fully decoded
through the guarded loader (components/ingestion/images.py). Facts are cached beside raw_dir by the file's
origin and version (components/ingestion/confine.py's `file_version`, or the sha256 of downloaded bytes), so a
rerun on an unchanged source recomputes nothing; the cache holds only for the same Pillow and limits.
"""

from __future__ import annotations

import array
import functools
import hashlib
import itertools
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from components.core.progress import progress
from components.ingestion.confine import Entry, IngestError
from components.ingestion.facts_cache import FactsCache
from components.ingestion.facts_table import FactsTable
from components.ingestion.images import ImageLimits, UnusableImage, inspect_image
from components.ingestion.source_copy import bounded_map

CHUNK = 1 << 20
# Below this many files a process pool costs more to start than it saves.
MIN_FILES_FOR_POOL = 64
MAX_CHUNK = 64  # files a worker inspects per task: few enough that a bounded number of tasks stays small


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


def _inspect_chunk(paths: list[str], limits: ImageLimits) -> list[dict[str, Any]]:
    return [inspect_file(path, limits) for path in paths]


# --------------------------------------------------------------------------------------------
# Every file's facts, into a FactsTable


def inspect_entries(
    entries: list[Entry], root: Path, cache: FactsCache, workers: int, limits: ImageLimits
) -> tuple[FactsTable, int, int]:
    """Facts for every present entry: from the cache when unchanged, else computed in a pool.

    Returns (facts by position in `entries`, files computed, processes used). Paths go to the pool a
    chunk at a time, with a bounded number of chunks in flight, so nothing per file is queued at once.
    """
    table = FactsTable(len(entries))
    todo = array.array("q")  # positions to inspect: 8 bytes a file, not a list of Python ints
    for i, e in enumerate(entries):
        if e.missing:
            continue
        cached = cache.get(e)
        if cached is not None:
            table.put(i, cached)
        else:
            todo.append(i)
    used = min(workers, len(todo)) if len(todo) >= MIN_FILES_FOR_POOL else 1
    size = max(1, min(MAX_CHUNK, len(todo) // (used * 16)))
    chunks = ([str(root / entries[i].rel) for i in todo[k : k + size]] for k in range(0, len(todo), size))
    bar = dict(total=len(todo), desc="ingest: hash+decode", unit="file")
    if used > 1:
        with ProcessPoolExecutor(max_workers=used) as pool:
            inspect = functools.partial(_inspect_chunk, limits=limits)
            done = itertools.chain.from_iterable(bounded_map(pool, inspect, chunks, 4 * used))
            for facts, i in zip(progress(done, **bar), todo):  # progress first: it prints its last line
                table.put(i, facts)
    else:
        for facts, i in zip(progress((inspect_file(p, limits) for c in chunks for p in c), **bar), todo):
            table.put(i, facts)
    return table, len(todo), used if todo else 0
