"""Near-duplicate search over perceptual fingerprints: which images lie within a Hamming distance.

Search: an exact multi-index over the phashes (`index_pairs`), or all pairs for small sets or large
distances, whichever `search_plan` estimates cheaper; both return the same pairs. Measured in
benchmarks/near_duplicates.py at max_distance 10: 0.4 s vs 9.5 s at 16k hashes, 30 s at 256k; growth
about n^1.7 between 64k and 256k (an exact radius-10 search on 64-bit hashes is not n log n: each query
probes hundreds to thousands of nearby chunk values), so about 5 minutes at 1M against about 10 hours.
Groups (`find_groups`) are the connected components of "within max_distance" pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np

from components.quality.perceptual_hashes import HALF, HASH_BITS

Search = Literal["auto", "index", "all_pairs"] | int  # int: multi-index with that many chunks
# Comparisons, lookups (query x mask) or candidates handled at once: about 1 MB per array, whatever the
# number of images (issue 24: 2M at once held about 100 MB at 37,000 images).
BATCH = 1 << 17


def find_groups(
    hashes: np.ndarray, max_distance: int, valid: np.ndarray | None = None, search: Search = "auto"
) -> list[list[int]]:
    """Row indices of near-duplicate groups (2+ members, each sorted), largest groups first.

    `hashes` holds 256-bit fingerprints (`perceptual_hashes.perceptual_hash`) or 128-bit ones without a mirror view. Two
    images pair when their phashes AND their dhashes are each within `max_distance`, comparing the two
    images directly or one's mirror image with the other. Groups are the connected components of pairs.
    `search` "index" uses the multi-index (`index_pairs`), "all_pairs" compares every pair, "auto" picks
    the cheaper by `search_plan`; both give the same pairs.
    """
    a, b = find_pairs(hashes, max_distance, valid, search)
    return connected_groups(len(hashes), a, b)


def find_pairs(
    hashes: np.ndarray, max_distance: int, valid: np.ndarray | None = None, search: Search = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) row indices of pairs that join groups (see `find_groups`): every near pair of distinct
    fingerprints, and each row with a byte-identical fingerprint joined to the first such row."""
    valid = np.ones(len(hashes), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rows = np.flatnonzero(valid)
    if len(rows) < 2:
        return np.zeros(0, int), np.zeros(0, int)
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
    same = first[inverse] != np.arange(len(rows))
    return rows[np.concatenate([first[a], first[inverse][same]])], rows[
        np.concatenate([first[b], np.flatnonzero(same)])
    ]


def connected_groups(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """The connected components of 2+ rows among n rows joined by the pairs (a[k], b[k]), each sorted,
    largest first."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    a, b = np.asarray(a, dtype=np.intp), np.asarray(b, dtype=np.intp)
    graph = scipy.sparse.coo_matrix((np.ones(len(a), np.int8), (a, b)), (n, n))
    _, labels = connected_components(graph, directed=False)
    grouped = np.flatnonzero(np.bincount(labels)[labels] > 1)  # rows in a component of 2+, ascending
    if not len(grouped):
        return []
    grouped = grouped[np.argsort(labels[grouped], kind="stable")]  # by component, rows still ascending in each
    found = [g.tolist() for g in np.split(grouped, np.flatnonzero(np.diff(labels[grouped])) + 1)]
    return sorted(found, key=lambda g: (-len(g), g[0]))


def _words(hashes: np.ndarray) -> np.ndarray:
    """(n, 4) uint64: phash, dhash, mirror phash, mirror dhash. A 128-bit hash is its own mirror.

    `hashes`: bits (bool, rows of 128 or 256) or packed bytes (uint8, rows of 16 or 32), as `fingerprints` gives.
    """
    hashes = np.asarray(hashes)
    if hashes.dtype == np.uint8 and hashes.ndim == 2 and hashes.shape[1] in (HALF // 8, HASH_BITS // 8):
        packed = hashes
    else:
        bits = hashes.astype(bool, copy=False)
        if bits.ndim != 2 or bits.shape[1] not in (HALF, HASH_BITS):
            raise ValueError(f"near-duplicate hashes of shape {bits.shape}: expected (rows, {HALF} or {HASH_BITS})")
        packed = np.packbits(bits, axis=1)
    if packed.shape[1] == HALF // 8:
        packed = np.concatenate([packed, packed], axis=1)
    return np.ascontiguousarray(packed).view(np.uint64).reshape(len(packed), 4)


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
    """(i, j) with i < j of every near-duplicate pair, comparing all pairs in blocks of about BATCH:
    O(n^2) time, O(n) memory. The reference the index is tested against."""
    found_a, found_b = [], []
    block = max(1, BATCH // max(1, len(words)))
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
    found: list[np.ndarray] = []
    for shift, width in _chunks(parts):
        table = _ChunkTable(words[:, 0], shift, width)
        masks = _masks(width, radius).astype(np.int32)
        query_values = table.values_of(queries[:, 0])
        batch = max(1, BATCH // len(masks))
        for start in range(0, len(queries), batch):
            keys = query_values[start : start + batch, None] ^ masks[None, :]
            hit_query, hit_mask = np.nonzero(table.counts[keys])
            hit_keys = keys[hit_query, hit_mask]
            for query, candidate in table.candidates(start + hit_query, hit_keys):
                pairs = _near(queries, words, query, candidate, max_distance, n)
                if len(pairs):  # only the pairs found are kept, not one array per slice
                    found.append(pairs)
        found = [_unique_pairs(found, n)]  # a pair is found in several chunks: kept once
    pairs = _unique_pairs(found, n)
    return pairs // n, pairs % n


class _ChunkTable:
    """The rows of the direct phashes by one chunk's value: a dense table of 2^width bucket sizes and starts."""

    def __init__(self, phashes: np.ndarray, shift: int, width: int) -> None:
        self.shift, self.bits = np.uint64(shift), np.uint64((1 << width) - 1)
        values = self.values_of(phashes)
        self.order = np.argsort(values, kind="stable").astype(np.int32)  # rows, by chunk value
        self.counts = np.bincount(values, minlength=1 << width).astype(np.int32)
        self.offsets = np.cumsum(self.counts, dtype=np.int64).astype(np.int32)
        self.offsets -= self.counts

    def values_of(self, phashes: np.ndarray) -> np.ndarray:
        return ((phashes >> self.shift) & self.bits).astype(np.int32)

    def candidates(self, query: np.ndarray, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(query, candidate row) for every row in the buckets `keys`, in slices of about BATCH pairs (a
        bucket larger than that comes whole)."""
        count = self.counts[keys]
        ends = np.cumsum(count, dtype=np.int64)
        first = 0
        while first < len(keys):
            done = int(ends[first - 1]) if first else 0
            last = max(first + 1, int(np.searchsorted(ends, done + BATCH, side="right")))
            part = count[first:last]
            step = np.arange(int(ends[last - 1]) - done) - np.repeat(ends[first:last] - part - done, part)
            yield np.repeat(query[first:last], part), self.order[np.repeat(self.offsets[keys[first:last]], part) + step]
            first = last


def _unique_pairs(found: list[np.ndarray], n: int) -> np.ndarray:
    """The distinct pairs of `found` ((k, 2) arrays, or earlier results), each as one int64 i * n + j, sorted."""
    codes = [f if f.ndim == 1 else f[:, 0] * n + f[:, 1] for f in found]
    return np.unique(np.concatenate([np.zeros(0, np.int64), *codes]))


def _near(
    queries: np.ndarray, words: np.ndarray, query: np.ndarray, candidate: np.ndarray, max_distance: int, n: int
) -> np.ndarray:
    """(k, 2) int64 (i < j) of the (query view, candidate row) pairs within max_distance on both hashes."""
    near = np.bitwise_count(queries[query, 0] ^ words[candidate, 0]) <= max_distance
    query, candidate = query[near], candidate[near]
    near = np.bitwise_count(queries[query, 1] ^ words[candidate, 1]) <= max_distance
    owner, candidate = query[near] % n, candidate[near].astype(np.int64)
    other = owner != candidate
    owner, candidate = owner[other], candidate[other]
    return np.stack([np.minimum(owner, candidate), np.maximum(owner, candidate)], axis=1)
