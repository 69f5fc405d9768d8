"""Content hashes that name data, weights and cache entries: what changed is what reruns."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_version(manifest: str | Path) -> str:
    """The manifest's content hash: it lists every image's sha256, so it names the data exactly."""
    return file_sha256(manifest)[:16]


def content_key(parts: dict[str, Any]) -> str:
    """A short stable hash of everything that determines an artifact (cache and checkpoint names)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def weights_identity(weights: str) -> str:
    """'imagenet'/'none' as is; a weights file by content, so replacing the file changes the key."""
    path = Path(weights)
    return f"file:{file_sha256(path)}" if weights not in ("imagenet", "none") and path.is_file() else weights


def records_version(records: Iterable[tuple[str, str, str, str]]) -> str:
    """The data version of a manifest's (relative path, label, split, sha256) rows, in any order."""
    return ordered_records_version(sorted(records))


def ordered_records_version(records: Iterable[tuple[str, str, str, str]]) -> str:
    """`records_version` of records already in sorted order, read one at a time (none held: issue 24)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update("\t".join(record).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
