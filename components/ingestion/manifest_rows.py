"""Ingest's manifest rows: one per file, its split fixed by a hash of its bytes, and what they add up to.

Splits come from a hash of each image's bytes: adding images never moves an existing one, and
byte-identical files always share a split. A source that brings its own train split but lacks val
or test has them carved from train the same way. One exception follows (components/ingestion/val_topup.py):
a class with too few val images borrows its lowest-hash training images, and as its val grows they go back
to train a few at a time; test is never touched, and identical files still share a split.
Undecodable, hidden, non-image files and images in other formats stay in the manifest with an `error`
so that validate can report them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.core.contracts import SPLITS
from components.core.hashing import records_version
from components.core.stage_config import SplitFractions
from components.ingestion.confine import Entry
from components.ingestion.file_facts import blank_facts


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


def build_rows(
    entries: list[Entry], facts: dict[str, dict[str, Any]], raw_dir: Path, seed: int, fractions: SplitFractions
) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifest rows (sorted by path) with splits; notes say which splits were carved from train, and which images'
    EXIF orientation could not be read."""
    given = {e.given_split for e in entries if e.given_split}
    missing = [s for s in SPLITS if s not in given]
    notes = []
    carve = bool(given) and "train" in given and bool(missing)
    if carve:
        notes.append(
            f"the source has no {'/'.join(missing)} split: carved from train by content hash "
            f"({', '.join(f'{s}={getattr(fractions, s):g}' for s in ['train', *missing])}, renormalised)"
        )
    elif given and missing:
        notes.append(f"the source has no train split; {'/'.join(missing)} left empty")
    rows = []
    for e in entries:
        f = facts.get(e.origin) or blank_facts(f"source file not found: {e.origin}")
        error = "hidden or system file (e.g. .DS_Store), not an image" if e.hidden else f["error"]
        key = f["sha256"] or hashlib.sha256(e.origin.encode()).hexdigest()
        split = e.given_split
        if split is None:
            split = assign_split(key, seed, fractions)
        elif split == "train" and carve:
            split = assign_split(key, seed, fractions, among=["train", *missing])
        rows.append(
            {
                "path": (raw_dir / e.rel).as_posix(),
                "label": e.label,
                "split": split,
                "sha256": f["sha256"],
                "bytes": f["bytes"],
                "width": f["width"],
                "height": f["height"],
                "format": f["format"],
                "mode": f["mode"],
                "source": e.origin,
                "error": error,
                "_rel": e.rel,
            }
        )
    rows.sort(key=lambda r: r["path"])
    unoriented = sorted(e.rel for e in entries if (facts.get(e.origin) or {}).get("note"))
    if unoriented:
        notes.append(
            f"{len(unoriented)} image(s) with an unreadable EXIF orientation are used as stored, perhaps on their "
            f"side (e.g. {unoriented[0]}): rewrite them upright, or fix their orientation tag"
        )
    return rows, notes


def count_images(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for r in rows:
        if not r["error"]:
            counts[r["split"]][r["label"]] = counts[r["split"]].get(r["label"], 0) + 1
    return {s: dict(sorted(c.items())) for s, c in counts.items()}


def summarise_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the manifest holds, as both the stage's result and its report state it."""
    return {
        "files": len(rows),
        "images": sum(1 for r in rows if not r["error"]),
        "unreadable": sum(1 for r in rows if r["error"]),
        "bytes": sum(int(r["bytes"]) for r in rows),
        "counts": count_images(rows),
        "data_version": records_version((r["_rel"], r["label"], r["split"], r["sha256"]) for r in rows),
    }
