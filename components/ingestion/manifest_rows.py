"""Ingest's manifest rows: one per file, its split fixed by a hash of its bytes, and what they add up to.

Splits come from a hash of each image's bytes: adding images never moves an existing one, and
byte-identical files always share a split. A source that brings its own train split but lacks val
or test has them carved from train the same way. One exception follows (components/ingestion/val_topup.py):
a class with too few val images borrows its lowest-hash training images, and as its val grows they go back
to train a few at a time; test is never touched, and identical files still share a split.
Undecodable, hidden, non-image files and images in other formats stay in the manifest with an `error`
so that validate can report them.
What is kept of every file is a few bytes in arrays (`SplitColumns`, facts_table.FactsTable) beside its listing
entry; rows are made one at a time as the manifest is written (issue 24: bounded memory at a million files).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from components.core.contracts import SPLITS
from components.core.hashing import ordered_records_version, records_version
from components.core.stage_config import SplitFractions
from components.ingestion.confine import Entry
from components.ingestion.facts_table import FactsTable, Vocabulary
from components.ingestion.file_facts import blank_facts
from components.ingestion.layout import safe_relative


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


@dataclass
class SplitColumns:
    """What the split assignment and the val top-up need of every file, a few bytes each, in manifest order."""

    labels: Vocabulary  # label code -> label
    label: np.ndarray  # int32: the file's label code
    split: np.ndarray  # uint8: index into SPLITS
    sha256: np.ndarray  # (n, 32) uint8; zeros where the file was not read
    known: np.ndarray  # bool: sha256 known
    usable: np.ndarray  # bool: the manifest's `error` is empty


def manifest_order(entries: list[Entry], raw_dir: Path) -> None:
    """Sort entries in place as the manifest lists them: by path (stable)."""
    if all(safe_relative(e.rel) for e in entries):
        entries.sort(key=attrgetter("rel"))  # a plain relative path: the paths sort as the rels do
    else:
        entries.sort(key=lambda e: (raw_dir / e.rel).as_posix())


def assign_splits(
    entries: list[Entry], facts: FactsTable, seed: int, fractions: SplitFractions
) -> tuple[SplitColumns, list[str]]:
    """Every file's split; notes say which splits were carved from train, and which images' EXIF orientation
    could not be read."""
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
    labels, codes = Vocabulary(), np.zeros(len(entries), np.int32)
    splits = np.zeros(len(entries), np.uint8)
    for i, e in enumerate(entries):
        codes[i] = labels.code(e.label)
        split = e.given_split
        if split is None or (split == "train" and carve):
            # An unread file (missing, unreadable) by its place in the data folder, not by where the source lies.
            key = facts.sha_hex(i) or hashlib.sha256(e.rel.encode()).hexdigest()
            split = assign_split(key, seed, fractions, among=SPLITS if split is None else ["train", *missing])
        splits[i] = SPLITS.index(split)
    hidden = np.fromiter((e.hidden for e in entries), bool, len(entries))
    columns = SplitColumns(labels, codes, splits, facts.sha256, facts.known, facts.usable() & ~hidden)
    unoriented = np.flatnonzero(facts.note)
    if len(unoriented):
        first = min(entries[i].rel for i in unoriented)
        notes.append(
            f"{len(unoriented)} image(s) with an unreadable EXIF orientation are used as stored, perhaps on their "
            f"side (e.g. {first}): rewrite them upright, or fix their orientation tag"
        )
    return columns, notes


def manifest_rows(
    entries: list[Entry], facts: FactsTable, columns: SplitColumns, raw_dir: Path
) -> Iterator[tuple[Any, ...]]:
    """The manifest's rows (MANIFEST_COLUMNS), one at a time, in the entries' order."""
    for i, e in enumerate(entries):
        f = facts.get(i) if facts.known[i] else blank_facts(f"source file not found: {e.origin}")
        error = "hidden or system file (e.g. .DS_Store), not an image" if e.hidden else f["error"]
        yield (
            (raw_dir / e.rel).as_posix(),
            e.label,
            SPLITS[columns.split[i]],
            f["sha256"],
            f["bytes"],
            f["width"],
            f["height"],
            f["format"],
            f["mode"],
            e.origin,
            error,
        )


def count_images(columns: SplitColumns) -> dict[str, dict[str, int]]:
    """split -> label -> decodable images, labels sorted."""
    counts = {}
    for code, name in enumerate(SPLITS):
        per_label = np.bincount(columns.label[columns.usable & (columns.split == code)], minlength=len(columns.labels))
        counts[name] = dict(sorted((columns.labels[c], int(n)) for c, n in enumerate(per_label) if n))
    return counts


def summarise_rows(entries: list[Entry], facts: FactsTable, columns: SplitColumns) -> dict[str, Any]:
    """What the manifest holds, as both the stage's result and its report state it."""
    images = int(np.count_nonzero(columns.usable))
    records = ((e.rel, e.label, SPLITS[columns.split[i]], facts.sha_hex(i)) for i, e in enumerate(entries))
    rels_ascend = all(a.rel < b.rel for a, b in pairwise(entries))  # then the records are in sorted order
    return {
        "files": len(entries),
        "images": images,
        "unreadable": len(entries) - images,
        "bytes": int(facts.bytes.sum()),
        "counts": count_images(columns),
        "data_version": ordered_records_version(records) if rels_ascend else records_version(records),
    }
