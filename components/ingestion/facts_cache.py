"""The facts cache: each file's facts from an earlier run, in SQLite beside raw_dir, read one file at a time.

Keyed by the file's origin and version (components/ingestion/confine.py's `file_version`, or the sha256
of downloaded bytes), valid only for the same Pillow and image limits (the `signature`). It was one JSON
file loaded whole (~1 KB of Python objects per file, issue 24); SQLite looks each file up on disk and
writes the new cache row by row, so its memory does not grow with the source. A cache from before
(`files.json`) is not read: those files are inspected once more, and the old file is removed.
A damaged or unreadable cache only costs a recompute.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import PIL

from components.ingestion.confine import Entry
from components.ingestion.facts_table import FactsTable
from components.ingestion.images import ImageLimits

CACHE_FILE = "facts.sqlite"
LEGACY_CACHE_FILE = "files.json"  # before issue 24: ignored, then removed
_COLUMNS = "size, version, sha256, bytes, format, mode, width, height, error, note"
_CREATE = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    "CREATE TABLE files (origin TEXT PRIMARY KEY, size INTEGER NOT NULL, version TEXT NOT NULL,"
    " sha256 BLOB NOT NULL, bytes INTEGER NOT NULL, format TEXT NOT NULL, mode TEXT NOT NULL,"
    " width INTEGER NOT NULL, height INTEGER NOT NULL, error TEXT NOT NULL, note TEXT)"
)


class FactsCache:
    """Facts of files keyed by (origin, size, version); valid only for the same Pillow and image limits.

    A local file's version is its size, mtime, ctime, inode and device (sources.file_version): a file
    swapped in with the same size and a restored mtime still gets a new ctime, so it is inspected again.
    Use as a context manager: the earlier cache stays open for lookups until the block ends.
    """

    def __init__(self, folder: Path, limits: ImageLimits) -> None:
        self.path = folder / CACHE_FILE
        self.legacy = folder / LEGACY_CACHE_FILE
        self.signature = json.dumps(
            {
                "pillow": PIL.__version__,
                "max_pixels": limits.max_pixels,
                "max_image_bytes": limits.max_bytes,
                "formats": list(limits.formats or ()),
                # 3: only allowed formats decoded; embedded images checked. 4: upright (EXIF) sizes. 5: SQLite
                "schema": 5,
            },
            sort_keys=True,
        )
        self._db: sqlite3.Connection | None = None

    def __enter__(self) -> FactsCache:
        if self.path.is_file():
            db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                stored = db.execute("SELECT value FROM meta WHERE key = 'signature'").fetchone()
            except sqlite3.Error:
                stored = None  # damaged: every file is inspected again
            if stored is not None and stored[0] == self.signature:
                self._db = db
            else:
                db.close()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, entry: Entry) -> dict[str, Any] | None:
        """The entry's facts from the earlier run, if it is the same file (origin, size and version)."""
        if self._db is None or not entry.version:
            return None
        try:
            hit = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE origin = ?", (entry.origin,)).fetchone()
        except sqlite3.Error:
            return None
        if hit is None or hit[0] != entry.size or hit[1] != entry.version or not _well_formed(hit):
            return None
        facts = dict(zip(("sha256", "bytes", "format", "mode", "width", "height", "error"), hit[2:9]))
        facts["sha256"] = facts["sha256"].hex()
        if hit[9] is not None:
            facts["note"] = hit[9]
        return facts

    def save(self, entries: list[Entry], table: FactsTable) -> None:
        """Write the facts of the current files only (so the cache never outgrows the source), then swap it in."""
        self.close()
        fresh = self.path.with_name(self.path.name + ".new")  # ours alone: the caller holds the cache's lock
        fresh.unlink(missing_ok=True)
        db = sqlite3.connect(fresh)
        try:
            db.execute("PRAGMA journal_mode = OFF")  # a new file, renamed in only when complete
            db.executescript(_CREATE)
            with db:
                db.execute("INSERT INTO meta VALUES ('signature', ?)", (self.signature,))
                db.executemany(
                    f"INSERT OR REPLACE INTO files (origin, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _cache_rows(entries, table),
                )
        finally:
            db.close()
        os.replace(fresh, self.path)
        self.legacy.unlink(missing_ok=True)


# The types of a row's facts (sha256 .. error, note); a row that differs is not trusted (inspected again).
_FACT_TYPES = (bytes, int, str, str, int, int, str, (str, type(None)))


def _well_formed(hit: tuple[Any, ...]) -> bool:
    values = hit[2:]
    return len(values) == len(_FACT_TYPES) and all(map(isinstance, values, _FACT_TYPES)) and len(values[0]) == 32


def _cache_rows(entries: list[Entry], table: FactsTable) -> Iterator[tuple[Any, ...]]:
    words = table.words
    for i, e in enumerate(entries):
        if e.version and table.known[i]:
            note = words[table.note[i]] if table.note[i] else None
            yield (
                e.origin,
                e.size,
                e.version,
                table.sha256[i].tobytes(),
                int(table.bytes[i]),
                words[table.format[i]],
                words[table.mode[i]],
                int(table.width[i]),
                int(table.height[i]),
                words[table.error[i]],
                note,
            )
