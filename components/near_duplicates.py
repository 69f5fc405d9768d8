"""Near-duplicates: the same photo resized, re-encoded or lightly cropped, which byte hashes miss.

Method (measured in benchmarks/data_quality.py on flower_photos): two 64-bit perceptual hashes of a
grayscale thumbnail, `imagehash.phash` (low DCT frequencies) and `imagehash.dhash` (horizontal
gradients); two images are near-duplicates when BOTH Hamming distances are at most
`validate.near_duplicates.max_distance` (default 10). On copies of flower photos it found 100% of
those resized to 50% or 25% and re-encoded at JPEG quality 30, about a third of 10% crops and no
heavier crop, with no false pair; over all 6.7M pairs of flower_photos it paired one image across
labels, a true duplicate. phash alone at 10 paired 10 across labels (flowers centred on a dark
background look alike to it); requiring dhash to agree removes those. Backbone-embedding cosine
similarity catches crops but misses downscaled copies and needs a model pass in validate, so it is
not used here. Hashes are computed once per image and cached by the manifest's sha256 column.

Mirror images: each image is also hashed as its horizontally mirrored thumbnail (same decode), and a
pair counts when the direct hashes, or one image's mirror hashes against the other's direct hashes, are
within the distance. A mirrored copy is an exact leak for a model trained with horizontal flips; the
direct hashes alone grouped none (issue 24: 0 of 2 planted). Still missed by design: most crops of
10% or more, rotations, vertical flips, heavy recolouring (the hashes see a small grayscale thumbnail).

Search: an exact multi-index over the phashes (`index_pairs`), or all pairs for small sets or large
distances, whichever `search_plan` estimates cheaper; both return the same pairs. Measured in
benchmarks/near_duplicates.py at max_distance 10: 0.4 s vs 9.5 s at 16k hashes, 30 s at 256k; growth
about n^1.7 between 64k and 256k (an exact radius-10 search on 64-bit hashes is not n log n: each query
probes hundreds to thousands of nearby chunk values), so about 5 minutes at 1M against about 10 hours.

Groups are the connected components of "within max_distance" pairs. `resolve` applies the policy:
  different labels         -> every member quarantined as a label conflict (as exact duplicates are);
  more than one split      -> a leak: `move` puts every member in the split of the member with the
                              smallest content hash (deterministic, independent of row order),
                              `report` only lists it, `fail` makes it a problem that fails validation;
  one split, one label     -> reported (harmless to accuracy estimates, slightly over-weights the photo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from components import files
from components.images import DECODE_VERSION, ImageLimits, UnusableImage, decode_rgb
from components.progress import progress
from components.stage_config import NearDuplicatesConfig

HASH_BITS = 256  # phash, dhash (64 each) of the thumbnail, then of its mirror image
HALF = 128  # bits of one view (phash then dhash)
# Bumped when the fingerprint or the decode (EXIF orientation) changes: old cache entries are then ignored
CACHE_VERSION = f"phash8+dhash8+mirror-v2+decode{DECODE_VERSION}"
QUARANTINE_COLUMNS = ["path", "label", "split", "checks", "reason"]
# Labels and file names come from the source: plain text, so a '$' in one is not matplotlib mathtext (or LaTeX).
PLAIN_TEXT = {"parse_math": False, "usetex": False}
Policy = Literal["move", "report", "fail"]
Search = Literal["auto", "index", "all_pairs"] | int  # int: multi-index with that many chunks


def perceptual_hash(source: str | Path | bytes, limits: ImageLimits) -> np.ndarray:
    """256 bits (bool): phash, dhash of an image, then phash, dhash of its mirror image; one guarded decode."""
    import imagehash
    from PIL import Image

    # Both hashes squash the image to a small grayscale thumbnail; decoding at 64 px lets JPEG draft mode skip work.
    thumb = Image.fromarray(decode_rgb(source, 64, limits))
    mirror = thumb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    views = [fn(view).hash for view in (thumb, mirror) for fn in (imagehash.phash, imagehash.dhash)]
    return np.concatenate([np.asarray(bits, dtype=bool).ravel() for bits in views])


def fingerprints(
    frame: pd.DataFrame, limits: ImageLimits, cache_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """((rows, 256) bool hashes, (rows,) bool decoded) of the manifest's images, by its path and sha256
    columns. Images that cannot be decoded get no hash (validate's decode check reports them).
    Reuses and extends the cache at `cache_path` (a workspace cache, keyed by content hash)."""
    cache = _read_cache(cache_path)
    out = np.zeros((len(frame), HASH_BITS), dtype=bool)
    decoded = np.zeros(len(frame), dtype=bool)
    fresh: dict[str, np.ndarray] = {}
    rows = progress(zip(frame["path"], frame["sha256"]), len(frame), "validate: perceptual hashes")
    for i, (path, sha) in enumerate(rows):
        bits = cache.get(sha, fresh.get(sha))  # byte-identical rows are hashed once
        if bits is None:
            try:
                bits = perceptual_hash(path, limits)
            except UnusableImage:
                continue  # validate's decode check reports it; it simply joins no group
            fresh[sha] = bits
        out[i], decoded[i] = bits, True
    if cache_path is not None and fresh:
        _write_cache(cache_path, {**cache, **fresh})
    return out, decoded


def _read_cache(cache_path: str | Path | None) -> dict[str, np.ndarray]:
    if cache_path is None or not Path(cache_path).is_file():
        return {}
    try:
        with np.load(cache_path, allow_pickle=False) as data:
            if str(data["version"]) != CACHE_VERSION:
                return {}  # an older fingerprint (e.g. without the mirror view) is recomputed, never misread
            bits = np.unpackbits(data["bits"], axis=1).astype(bool)
            return dict(zip(data["sha256"].tolist(), bits)) if bits.shape[1:] == (HASH_BITS,) else {}
    except (OSError, ValueError, KeyError):
        return {}  # a damaged cache is recomputed, never trusted


def _write_cache(cache_path: str | Path, entries: dict[str, np.ndarray]) -> None:
    keys = sorted(entries)
    with files.atomic_file(cache_path, "wb") as fh:
        np.savez(
            fh,
            version=np.array(CACHE_VERSION),
            sha256=np.array(keys, dtype="U64"),
            bits=np.packbits(np.stack([entries[k] for k in keys]), axis=1),
        )


def find_groups(
    hashes: np.ndarray, max_distance: int, valid: np.ndarray | None = None, search: Search = "auto"
) -> list[list[int]]:
    """Row indices of near-duplicate groups (2+ members, each sorted), largest groups first.

    `hashes` holds 256-bit fingerprints (`perceptual_hash`) or 128-bit ones without a mirror view. Two
    images pair when their phashes AND their dhashes are each within `max_distance`, comparing the two
    images directly or one's mirror image with the other. Groups are the connected components of pairs.
    `search` "index" uses the multi-index (`index_pairs`), "all_pairs" compares every pair, "auto" picks
    the cheaper by `search_plan`; both give the same pairs.
    """
    n = len(hashes)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rows = np.flatnonzero(valid)
    if len(rows) < 2:
        return []
    # Byte-identical fingerprints are grouped outright, and searched once: a heap of identical hashes
    # (blank images, copies) would otherwise fill one bucket with k^2 candidates.
    unique, first, inverse = np.unique(_words(hashes[rows]), axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    plan = search_plan(len(unique), max_distance) if search == "auto" else search
    if plan == "all_pairs":
        a, b = all_pairs(unique, max_distance)
    elif plan == "index" or isinstance(plan, int):
        a, b = index_pairs(unique, max_distance, None if plan == "index" else plan)
    else:
        raise ValueError(f"near-duplicate search {search!r}: expected auto, index or all_pairs")
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    edges_from = np.concatenate([first[a], np.arange(len(rows))])
    edges_to = np.concatenate([first[b], first[inverse]])
    graph = scipy.sparse.coo_matrix((np.ones(len(edges_from), np.int8), (edges_from, edges_to)), (len(rows),) * 2)
    _, labels = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for position, label in enumerate(labels.tolist()):
        members.setdefault(label, []).append(int(rows[position]))
    found = [g for g in members.values() if len(g) > 1]  # rows ascend, so each group is sorted
    return sorted(found, key=lambda g: (-len(g), g[0]))


def _words(hashes: np.ndarray) -> np.ndarray:
    """(n, 4) uint64: phash, dhash, mirror phash, mirror dhash. A 128-bit hash is its own mirror."""
    bits = np.asarray(hashes, dtype=bool)
    if bits.ndim != 2 or bits.shape[1] not in (HALF, HASH_BITS):
        raise ValueError(f"near-duplicate hashes of shape {bits.shape}: expected (rows, {HALF} or {HASH_BITS})")
    if bits.shape[1] == HALF:
        bits = np.concatenate([bits, bits], axis=1)
    return np.ascontiguousarray(np.packbits(bits, axis=1)).view(np.uint64).reshape(len(bits), 4)


def _close(query: np.ndarray, found: np.ndarray, max_distance: int) -> np.ndarray:
    """Whether (phash, dhash) word pairs (last axis 2) are within max_distance on both hashes."""
    return np.all(np.bitwise_count(query ^ found) <= max_distance, axis=-1)


def _pairs_of(query: np.ndarray, found: np.ndarray, max_distance: int) -> np.ndarray:
    """The near-duplicate relation on (..., 4) words: direct vs direct, mirror vs direct, direct vs mirror."""
    return (
        _close(query[..., :2], found[..., :2], max_distance)
        | _close(query[..., 2:], found[..., :2], max_distance)
        | _close(query[..., :2], found[..., 2:], max_distance)
    )


def all_pairs(words: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j of every near-duplicate pair, comparing all pairs in blocks of at most 2M:
    O(n^2) time, O(n) memory. The reference the index is tested against."""
    found_a, found_b = [], []
    block = max(1, (1 << 21) // max(1, len(words)))
    for start in range(0, len(words), block):
        rows = words[start : start + block]
        a, b = np.nonzero(_pairs_of(rows[:, None, :], words[None, start:, :], max_distance))
        i, j = start + a, start + b
        found_a.append(i[i < j])
        found_b.append(j[i < j])
    return (np.concatenate(found_a), np.concatenate(found_b)) if found_a else (np.zeros(0, int), np.zeros(0, int))


def _chunks(parts: int) -> list[tuple[int, int]]:
    """(shift, width) of `parts` near-equal bit ranges covering a 64-bit word."""
    widths = [64 // parts + (1 if k < 64 % parts else 0) for k in range(parts)]
    return [(sum(widths[:k]), w) for k, w in enumerate(widths)]


def _masks(width: int, radius: int) -> np.ndarray:
    """Every width-bit value with at most `radius` bits set (the XOR masks of a ball of that radius)."""
    from itertools import combinations

    return np.array(
        [sum(1 << b for b in bits) for k in range(radius + 1) for bits in combinations(range(width), k)],
        dtype=np.uint64,
    )


def _ball_size(width: int, radius: int) -> int:
    from math import comb

    return sum(comb(width, k) for k in range(radius + 1))


MAX_PROBES = 1 << 16  # XOR masks per chunk: more and a chunk plan costs more than it saves
MIN_PARTS = 3  # chunks of at most 22 bits: each chunk's lookup table is a dense array of 2^width entries


def search_plan(n: int, max_distance: int) -> Literal["all_pairs"] | int:
    """The cheaper search by a cost model for uniformly random hashes: "all_pairs" or the number of
    phash chunks for `index_pairs`. With m chunks each query (image and mirror) probes every value within
    max_distance // m bits of each chunk and meets about n / 2^width random candidates per probe. The
    weights (a probe costs about 0.15 of one all-pairs comparison, a candidate 0.4) were measured with
    benchmarks/near_duplicates.py. Large max_distance leaves only tiny chunks: all pairs then wins.
    """
    best: tuple[float, Literal["all_pairs"] | int] = (n * n / 2, "all_pairs")
    for parts in range(MIN_PARTS, 65):
        chunks = _chunks(parts)
        probes = [_ball_size(width, max_distance // parts) for _, width in chunks]
        if max(probes) > MAX_PROBES:
            continue
        per_query = sum(p * (0.15 + 0.4 * n / 2.0**width) for p, (_, width) in zip(probes, chunks))
        best = min(best, (2 * n * per_query, parts), key=lambda c: c[0])
    return best[1]


def index_pairs(words: np.ndarray, max_distance: int, parts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) with i < j of every near-duplicate pair, exactly the pairs of `all_pairs`, by multi-index
    hashing (Norouzi, Punjani and Fleet 2012) of the phashes.

    The phash is cut into `parts` chunks (default: `search_plan`'s choice, at least 3). Two phashes
    within d bits differ by at most d // parts bits in at least one chunk (pigeonhole), so every pair is
    found by looking up, for each chunk of each query (an image's phash and its mirror's), every value
    within that radius in a table of the chunk values of all direct phashes; each candidate is then
    checked in full. Exact for every max_distance (at parts > max_distance the radius is 0: plain
    buckets, and at large distances nearly every pair becomes a candidate: exact but no faster).
    """
    n = len(words)
    if parts is None:
        plan = search_plan(n, max_distance)
        parts = max(MIN_PARTS, max_distance + 1) if plan == "all_pairs" else plan
    if not MIN_PARTS <= parts <= 64:
        raise ValueError(f"multi-index chunks {parts}: expected {MIN_PARTS} to 64")
    radius = max_distance // parts
    queries = np.concatenate([words[:, :2], words[:, 2:]])  # direct views, then mirror views
    found_a, found_b = [], []
    for shift, width in _chunks(parts):
        bits = np.uint64((1 << width) - 1)
        values = ((words[:, 0] >> np.uint64(shift)) & bits).astype(np.intp)
        order = np.argsort(values, kind="stable")
        counts = np.bincount(values, minlength=1 << width)
        offsets = np.cumsum(counts) - counts
        occupied = counts > 0
        masks = _masks(width, radius).astype(np.intp)
        query_values = ((queries[:, 0] >> np.uint64(shift)) & bits).astype(np.intp)
        batch = max(1, (1 << 21) // len(masks))
        for start in range(0, len(queries), batch):
            keys = query_values[start : start + batch, None] ^ masks[None, :]
            hit_query, hit_mask = np.nonzero(occupied[keys])
            key = keys[hit_query, hit_mask]
            count = counts[key]
            query = start + np.repeat(hit_query, count)
            step = np.arange(len(query)) - np.repeat(np.cumsum(count) - count, count)
            candidate = order[np.repeat(offsets[key], count) + step]
            near = np.bitwise_count(queries[query, 0] ^ words[candidate, 0]) <= max_distance
            query, candidate = query[near], candidate[near]
            near = np.bitwise_count(queries[query, 1] ^ words[candidate, 1]) <= max_distance
            owner, candidate = query[near] % n, candidate[near]
            found_a.append(np.minimum(owner, candidate)[owner != candidate])
            found_b.append(np.maximum(owner, candidate)[owner != candidate])
    pairs = np.unique(np.stack([np.concatenate(found_a), np.concatenate(found_b)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


@dataclass
class NearDuplicateReport:
    """What `resolve` found and did; `counts` goes into the validation summary."""

    policy: str
    groups: list[dict[str, Any]] = field(default_factory=list)  # members (path, label, split, sha256), kind, action
    moved: list[dict[str, str]] = field(default_factory=list)  # path, from, to
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=QUARANTINE_COLUMNS))
    problems: list[str] = field(default_factory=list)  # non-empty only with policy fail and a leak

    @property
    def counts(self) -> dict[str, int]:
        kinds = [g["kind"] for g in self.groups]
        return {
            "groups": len(self.groups),
            "images_in_groups": sum(len(g["members"]) for g in self.groups),
            "within_split": kinds.count("within_split"),
            "cross_split": kinds.count("cross_split"),
            "label_conflicts": kinds.count("label_conflict"),
            "moved_images": len(self.moved),
            "quarantined_images": len(self.quarantine),
        }

    def to_dict(self, max_groups: int = 50) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "counts": self.counts,
            "groups": self.groups[:max_groups],
            "moved": self.moved,
            "problems": self.problems,
        }


def resolve(frame: pd.DataFrame, groups: list[list[int]], policy: Policy) -> tuple[pd.DataFrame, NearDuplicateReport]:
    """Apply `policy` to the groups (row positions in `frame`).

    Returns the rows to keep (label conflicts removed, leaked groups moved with policy `move`; the
    input is not modified) and the report, whose `quarantine` holds the removed rows in validate's
    quarantine.csv columns.
    """
    if policy not in ("move", "report", "fail"):
        raise ValueError(f"near-duplicate policy {policy!r}: expected move, report or fail")
    out = frame.copy()
    split_col = out.columns.get_loc("split")
    report = NearDuplicateReport(policy)
    dropped: list[dict[str, str]] = []
    for group in groups:
        members = frame.iloc[group]
        entry = {"members": members[["path", "label", "split", "sha256"]].to_dict("records")}
        if members["label"].nunique() > 1:
            entry.update(kind="label_conflict", action="quarantined")
            for row in members.itertuples():
                others = members[members["label"] != row.label]
                dropped.append(
                    {
                        "path": row.path,
                        "label": row.label,
                        "split": row.split,
                        "checks": "no_near_duplicate_label_conflict",
                        "reason": "label conflict: a near-duplicate is labelled differently in "
                        + ", ".join(f"{p} ({lab})" for p, lab in zip(others["path"], others["label"])),
                    }
                )
        elif members["split"].nunique() > 1:
            target = members.sort_values("sha256", kind="stable")["split"].iloc[0]
            entry.update(kind="cross_split", target_split=target)
            if policy == "move":
                entry["action"] = f"moved to {target}"
                for position, row in zip(group, members.itertuples()):
                    if row.split != target:
                        out.iloc[position, split_col] = target
                        report.moved.append({"path": row.path, "from": row.split, "to": target})
            elif policy == "fail":
                entry["action"] = "failed"
                report.problems.append(
                    "leak: near-duplicates in splits "
                    + ", ".join(sorted(set(members["split"])))
                    + ": "
                    + ", ".join(members["path"])
                )
            else:
                entry["action"] = "reported"
        else:
            entry.update(kind="within_split", action="reported")
        report.groups.append(entry)
    report.quarantine = pd.DataFrame(dropped, columns=QUARANTINE_COLUMNS)
    keep = ~out["path"].isin(report.quarantine["path"])
    return out[keep.to_numpy()], report


def check(
    frame: pd.DataFrame,
    config: NearDuplicatesConfig,
    limits: ImageLimits,
    cache_path: str | Path | None,
    picture_path: str | Path | None = None,
) -> tuple[pd.DataFrame, NearDuplicateReport]:
    """validate's one call: hash (cached), group, apply `validate.near_duplicates`, draw the top groups.

    `frame` holds the rows that passed the file checks (path, label, split, sha256 columns); policy `off`
    returns it unchanged with an empty report.
    """
    if config.policy == "off":
        return frame.copy(), NearDuplicateReport("off")
    hashes, decoded = fingerprints(frame, limits, cache_path)
    kept, report = resolve(frame, find_groups(hashes, config.max_distance, decoded), config.policy)
    if picture_path is not None:
        plot_groups(frame, report, picture_path, limits)
    return kept, report


def plot_groups(
    frame: pd.DataFrame,
    report: NearDuplicateReport,
    path: str | Path,
    limits: ImageLimits,
    max_groups: int = 8,
    max_members: int = 6,
    thumb: int = 128,
) -> Path:
    """A PNG: one row per group (cross-split and conflicting groups first), thumbnails captioned label/split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"label_conflict": 0, "cross_split": 1, "within_split": 2}
    shown = sorted(report.groups, key=lambda g: (order[g["kind"]], -len(g["members"])))[:max_groups]
    rows = max(1, len(shown))
    cols = max([min(len(g["members"]), max_members) for g in shown] or [1])  # as wide as the largest group shown
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, group in enumerate(shown):
        for c, member in enumerate(group["members"][:max_members]):
            try:
                axes[r][c].imshow(decode_rgb(member["path"], thumb, limits))
            except UnusableImage:
                pass
            caption = f"{member['label']}/{member['split']}\n{Path(member['path']).name[:22]}"
            axes[r][c].set_title(caption, fontsize=7, **PLAIN_TEXT)
        axes[r][0].text(
            -0.1,
            0.5,
            f"{group['kind']}\n{group.get('action', '')}",
            transform=axes[r][0].transAxes,
            ha="right",
            va="center",
            fontsize=7,
            rotation=90,
        )
    if not shown:
        axes[0][0].text(0.5, 0.5, "no near-duplicate groups", ha="center", va="center")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
    return Path(path)
