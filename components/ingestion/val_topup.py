"""A val split big enough to decide on: classes with too few val images get some of their training images.

Finetune decides on val which weights to keep, whether flip TTA stays and the temperature; with a dozen
images per class those choices are coin flips. After the hash split, each class with fewer than
`ingest.min_val_per_class` decodable val images takes the missing ones from its own train images, at most
`ingest.max_val_share_per_class` of them, so a tiny class keeps most of its training data. Test images
never move, and nothing in the source changes: only the manifest's split column.

Which images move is fixed by the same hash as the split: within a class, the training images with the
lowest `split_position` (byte-identical copies move together). The moved set is a prefix of that order,
so adding images moves few existing ones, and a class whose val is already big enough moves none.
Works on the columns of every file (manifest_rows.SplitColumns): arrays, not a Python object per file.
"""

from __future__ import annotations

import math

import numpy as np

from components.core.contracts import SPLITS
from components.ingestion.manifest_rows import SplitColumns, split_position

TRAIN, VAL = SPLITS.index("train"), SPLITS.index("val")


def top_up_val(
    columns: SplitColumns, seed: int, min_per_class: int, max_share: float
) -> tuple[dict[str, int], list[str]]:
    """Move training files to val in `columns.split`; return images moved per class and the report's note."""
    labels = columns.labels
    val_per_code = np.bincount(columns.label[columns.usable & (columns.split == VAL)], minlength=len(labels))
    val_counts = {labels[c]: int(n) for c, n in enumerate(val_per_code) if n}
    train = np.flatnonzero(columns.usable & (columns.split == TRAIN))
    train = train[np.argsort(columns.label[train], kind="stable")]  # grouped by class
    starts = np.flatnonzero(np.diff(columns.label[train], prepend=-1)) if len(train) else train
    to_move: set[bytes] = set()
    for group in np.split(train, starts[1:]) if len(train) else []:
        label = labels[columns.label[group[0]]]
        wanted = min(min_per_class - val_counts.get(label, 0), math.floor(max_share * len(group)))
        if wanted > 0:
            to_move |= _lowest_hashes(columns.sha256, group, seed, wanted)
    moved: dict[str, int] = {}
    for i in _train_copies(columns, to_move):  # every train copy of a moved hash: identical files share a split
        columns.split[i] = VAL
        if columns.usable[i]:
            label = labels[columns.label[i]]
            moved[label] = moved.get(label, 0) + 1
    return dict(sorted(moved.items())), _notes(moved, val_counts, min_per_class, max_share)


def _lowest_hashes(sha256: np.ndarray, rows: np.ndarray, seed: int, wanted: int) -> set[bytes]:
    """The distinct hashes of `rows` lowest in (split_position, hash) order, as many as fit in `wanted` files.

    Stops at the first hash whose copies do not fit (stop, not skip: the moved set stays a prefix).
    """
    digests = sha256[rows]
    positions = np.fromiter((split_position(d.tobytes().hex(), seed) for d in digests), np.float64, len(rows))
    # Last key first: by position, then by the digest's bytes (the order of its hex string).
    order = np.lexsort((*digests.T[::-1], positions))
    chosen: set[bytes] = set()
    taken, k = 0, 0
    while k < len(order):
        first = digests[order[k]]
        end = k + 1
        while end < len(order) and np.array_equal(digests[order[end]], first):
            end += 1
        if taken + (end - k) > wanted:
            break
        chosen.add(first.tobytes())
        taken += end - k
        k = end
    return chosen


def _train_copies(columns: SplitColumns, hashes: set[bytes]) -> np.ndarray:
    """Train files (of any class, usable or not) whose bytes hash to one of `hashes`."""
    if not hashes:
        return np.zeros(0, np.int64)
    prefixes = np.array([int.from_bytes(h[:8], "big") for h in hashes], np.uint64)
    heads = columns.sha256[:, :8].copy().view(">u8").ravel()  # the digest's first 8 bytes: cheap to compare
    near = np.flatnonzero(columns.known & (columns.split == TRAIN) & np.isin(heads, prefixes))
    return near[[columns.sha256[i].tobytes() in hashes for i in near]] if len(near) else near


def _notes(moved: dict[str, int], val_before: dict[str, int], min_per_class: int, max_share: float) -> list[str]:
    if not moved:
        return []
    per_class = ", ".join(f"{label} {n} (val had {val_before.get(label, 0)})" for label, n in sorted(moved.items()))
    return [
        f"val topped up from train to decide on at least {min_per_class} images per class "
        f"(ingest.min_val_per_class; at most {max_share:g} of a class's train images move): {per_class}"
    ]
