"""A val split big enough to decide on: classes with too few val images get some of their training images.

Finetune decides on val which weights to keep, whether flip TTA stays and the temperature; with a dozen
images per class those choices are coin flips. After the hash split, each class with fewer than
`ingest.min_val_per_class` decodable val images takes the missing ones from its own train images, at most
`ingest.max_val_share_per_class` of them, so a tiny class keeps most of its training data. Test images
never move, and nothing in the source changes: only the manifest's split column.

Which images move is fixed by the same hash as the split: within a class, the training images with the
lowest `split_position` (byte-identical copies move together). The moved set is a prefix of that order,
so adding images moves few existing ones, and a class whose val is already big enough moves none.
"""

from __future__ import annotations

import math
from typing import Any

from components.ingestion.manifest_rows import split_position


def top_up_val(
    rows: list[dict[str, Any]], seed: int, min_per_class: int, max_share: float
) -> tuple[dict[str, int], list[str]]:
    """Move training rows to val in place; return images moved per class and the report's note."""
    val_counts: dict[str, int] = {}
    train_by_label: dict[str, dict[str, list[dict[str, Any]]]] = {}  # label -> sha256 -> decodable train rows
    for r in rows:
        if r["error"]:
            continue
        if r["split"] == "val":
            val_counts[r["label"]] = val_counts.get(r["label"], 0) + 1
        elif r["split"] == "train":
            train_by_label.setdefault(r["label"], {}).setdefault(r["sha256"], []).append(r)
    to_move: set[str] = set()
    for label, by_hash in sorted(train_by_label.items()):
        train_images = sum(len(group) for group in by_hash.values())
        wanted = min(min_per_class - val_counts.get(label, 0), math.floor(max_share * train_images))
        taken = 0
        for sha in sorted(by_hash, key=lambda s: (split_position(s, seed), s)):
            if taken + len(by_hash[sha]) > wanted:  # stop, not skip: the moved set stays a prefix
                break
            to_move.add(sha)
            taken += len(by_hash[sha])
    moved: dict[str, int] = {}
    for r in rows:  # every train copy of a moved hash, so byte-identical files keep sharing a split
        if r["split"] == "train" and r["sha256"] in to_move:
            r["split"] = "val"
            if not r["error"]:
                moved[r["label"]] = moved.get(r["label"], 0) + 1
    return dict(sorted(moved.items())), _notes(moved, val_counts, min_per_class, max_share)


def _notes(moved: dict[str, int], val_before: dict[str, int], min_per_class: int, max_share: float) -> list[str]:
    if not moved:
        return []
    per_class = ", ".join(f"{label} {n} (val had {val_before.get(label, 0)})" for label, n in sorted(moved.items()))
    return [
        f"val topped up from train to decide on at least {min_per_class} images per class "
        f"(ingest.min_val_per_class; at most {max_share:g} of a class's train images move): {per_class}"
    ]
