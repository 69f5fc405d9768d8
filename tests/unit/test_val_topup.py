"""ingest's val top-up on synthetic manifest rows: small classes get val images from their own train images
(lowest hash position first, capped), test never moves, and the choice is deterministic and stable."""

from __future__ import annotations

import hashlib
import random

import numpy as np

from components.core.contracts import SPLITS
from components.core.stage_config import IngestConfig, SplitFractions
from components.ingestion.facts_table import Vocabulary
from components.ingestion.manifest_rows import SplitColumns, assign_split, split_position
from components.ingestion.val_topup import top_up_val

SEED = 42
DEFAULT = IngestConfig()


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def row(label: str, name: str, split: str, error: str = "") -> dict:
    return {"path": f"{label}/{name}", "label": label, "split": split, "sha256": sha(name), "error": error}


def given(label: str, counts: dict[str, int], prefix: str = "") -> list[dict]:
    """Rows of one class whose splits the source gave."""
    return [row(label, f"{prefix}{label}-{split}-{i}", split) for split, n in counts.items() for i in range(n)]


def hashed(label: str, n: int, start: int = 0) -> list[dict]:
    """Rows of one class split by content hash with the default fractions."""
    names = [f"{label}-{i}" for i in range(start, start + n)]
    return [row(label, name, assign_split(sha(name), SEED, SplitFractions())) for name in names]


def columns_of(rows: list[dict]) -> SplitColumns:
    """The top-up's columns for manifest-like rows (what ingest keeps of every file instead of a dict)."""
    labels = Vocabulary()
    known = np.array([bool(r["sha256"]) for r in rows], bool)
    digests = [bytes.fromhex(r["sha256"]) if r["sha256"] else bytes(32) for r in rows]
    return SplitColumns(
        labels,
        np.array([labels.code(r["label"]) for r in rows], np.int32),
        np.array([SPLITS.index(r["split"]) for r in rows], np.uint8),
        np.frombuffer(b"".join(digests), np.uint8).reshape(len(rows), 32).copy(),
        known,
        known & np.array([not r["error"] for r in rows], bool),
    )


def top_up(rows: list[dict], min_per_class: int = 30, max_share: float = 0.3) -> tuple[dict[str, int], list[str]]:
    """top_up_val on the rows' columns; the new splits are written back into the rows."""
    columns = columns_of(rows)
    result = top_up_val(columns, SEED, min_per_class, max_share)
    for r, split in zip(rows, columns.split):
        r["split"] = SPLITS[split]
    return result


def splits(rows: list[dict]) -> dict[str, str]:
    return {r["path"]: r["split"] for r in rows}


def test_a_small_class_takes_its_lowest_hash_training_images_and_says_so():
    rows = given("ants", {"train": 100, "val": 5, "test": 10})
    train_before = sorted((r for r in rows if r["split"] == "train"), key=lambda r: split_position(r["sha256"], SEED))
    moved, notes = top_up(rows)
    assert moved == {"ants": 25}
    assert {r["path"] for r in rows if r["split"] == "val" and "-train-" in r["path"]} == {
        r["path"] for r in train_before[:25]
    }
    assert sum(r["split"] == "val" for r in rows) == 30
    assert notes == [
        "val topped up from train to decide on at least 30 images per class (ingest.min_val_per_class; "
        "at most 0.3 of a class's train images move): ants 25 (val had 5)"
    ]


def test_the_cap_keeps_most_of_a_tiny_class_for_training():
    rows = given("tiny", {"train": 20, "val": 2, "test": 2}) + given("big", {"train": 200, "val": 1})
    moved, notes = top_up(rows)
    assert moved == {"big": 29, "tiny": 6}  # tiny: 30% of 20 train images, short of the 28 it lacks
    assert sum(r["split"] == "train" and r["label"] == "tiny" for r in rows) == 14
    assert "tiny 6 (val had 2)" in notes[0] and "big 29 (val had 1)" in notes[0]


def test_test_images_never_move_and_errors_do_not_count():
    rows = given("a", {"test": 50, "val": 1}) + given("b", {"train": 30, "test": 40})
    rows += [row("b", f"broken-{i}", "train", error="cannot decode") for i in range(30)]
    before = splits(rows)
    moved, _ = top_up(rows)
    assert moved == {"b": 9}  # 30% of b's 30 decodable train images; a has none to give
    changed = {p for p, s in splits(rows).items() if s != before[p]}
    assert len(changed) == 9 and all("-train-" in p and before[p] == "train" for p in changed)


def test_a_class_with_enough_val_and_a_zero_minimum_move_nothing():
    rows = given("a", {"train": 300, "val": 30, "test": 30}) + given("b", {"train": 10, "val": 2})
    before = splits(rows)
    assert top_up(rows[:360]) == ({}, [])
    assert top_up(rows, min_per_class=0) == ({}, [])
    assert splits(rows) == before


def test_the_hash_carved_val_is_topped_up_and_identical_copies_move_together():
    rows = hashed("bees", 120)
    copy = next(r for r in sorted(rows, key=lambda r: split_position(r["sha256"], SEED)) if r["split"] == "train")
    rows.append({**copy, "path": "bees/copy.jpg"})
    val_before = sum(r["split"] == "val" for r in rows)
    moved, _ = top_up(rows)
    assert {r["split"] for r in rows if r["sha256"] == copy["sha256"]} == {"val"}
    assert sum(r["split"] == "val" for r in rows) == val_before + moved["bees"] >= 30 - 1  # a pair moves whole


def test_the_choice_does_not_depend_on_row_order():
    rows = hashed("a", 150) + hashed("b", 90)
    shuffled = [dict(r) for r in rows]
    random.Random(3).shuffle(shuffled)
    assert top_up(rows) == top_up(shuffled)
    assert splits(rows) == splits(shuffled)


def moved_by_top_up(rows: list[dict]) -> set[str]:
    """Paths in val that the hash put in train."""
    return {
        r["path"] for r in rows if r["split"] == "val" and assign_split(r["sha256"], SEED, SplitFractions()) != "val"
    }


def test_adding_images_moves_few_existing_ones():
    old = hashed("a", 200)
    top_up(old)
    grown = hashed("a", 240)  # the same 200 images and 40 new ones
    top_up(grown)
    before, after = splits(old), splits(grown)
    old_paths = set(before)
    moved_before, moved_after = moved_by_top_up(old), moved_by_top_up(grown) & old_paths
    assert moved_before and (moved_after <= moved_before or moved_before <= moved_after)  # one hash order's prefix
    changed = [p for p in before if after[p] != before[p]]
    assert all({before[p], after[p]} == {"train", "val"} for p in changed)  # never into or out of test
    assert 0 < len(changed) <= 40 * 0.3


def test_the_defaults_leave_a_flower_sized_class_alone():
    """flower_photos' smallest class has 633 images: the hash gives it about 63 val images, over 30."""
    rows = hashed("daisy", 633)
    before = splits(rows)
    assert top_up(rows, DEFAULT.min_val_per_class, DEFAULT.max_val_share_per_class) == ({}, [])
    assert splits(rows) == before


def top_up_on_dicts(rows: list[dict], min_per_class: int, max_share: float) -> tuple[dict[str, int], list[str]]:
    """The top-up as it was before issue 24 (a dict per row), kept as the oracle for the columns version."""
    val_counts: dict[str, int] = {}
    train_by_label: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r["error"]:
            continue
        if r["split"] == "val":
            val_counts[r["label"]] = val_counts.get(r["label"], 0) + 1
        elif r["split"] == "train":
            train_by_label.setdefault(r["label"], {}).setdefault(r["sha256"], []).append(r)
    to_move: set[str] = set()
    for label, by_hash in sorted(train_by_label.items()):
        wanted = min(min_per_class - val_counts.get(label, 0), int(max_share * sum(map(len, by_hash.values()))))
        taken = 0
        for s in sorted(by_hash, key=lambda s: (split_position(s, SEED), s)):
            if taken + len(by_hash[s]) > wanted:
                break
            to_move.add(s)
            taken += len(by_hash[s])
    moved: dict[str, int] = {}
    for r in rows:
        if r["split"] == "train" and r["sha256"] in to_move:
            r["split"] = "val"
            if not r["error"]:
                moved[r["label"]] = moved.get(r["label"], 0) + 1
    per_class = ", ".join(f"{label} {n} (val had {val_counts.get(label, 0)})" for label, n in sorted(moved.items()))
    notes = [
        f"val topped up from train to decide on at least {min_per_class} images per class "
        f"(ingest.min_val_per_class; at most {max_share:g} of a class's train images move): {per_class}"
    ]
    return dict(sorted(moved.items())), notes if moved else []


def test_the_columns_version_moves_exactly_what_the_dict_version_moved():
    """Random classes, splits, errors and copies (within and across classes, usable or not)."""
    for trial in range(40):
        rnd = random.Random(trial)
        names = [f"img-{trial}-{i}" for i in range(rnd.randint(1, 120))]
        rows = []
        for i in range(rnd.randint(1, 160)):
            name = rnd.choice(names)  # repeats: byte-identical copies
            label, split = rnd.choice("abcd"), rnd.choices(["train", "val", "test"], [8, 1, 1])[0]
            rows.append(row(label, f"{i}", split, error=rnd.choice(["", "", "", "", "broken"])) | {"sha256": sha(name)})
        expected_rows = [dict(r) for r in rows]
        min_per_class, share = rnd.randint(0, 40), rnd.choice([0.1, 0.3, 0.5, 1.0])
        assert top_up(rows, min_per_class, share) == top_up_on_dicts(expected_rows, min_per_class, share)
        assert splits(rows) == splits(expected_rows)
