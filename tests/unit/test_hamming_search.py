"""The compact near-duplicate search (issue 24): packed hashes, candidates in bounded slices, only the pairs
found kept. Checked against a plain-Python brute force, and its memory per image against a bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from components.quality import hamming_search as hs

MAX_DISTANCE = 10


def random_words(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(n * 32), dtype=np.uint64).reshape(n, 4).copy()


def flip(word: int, bits: int, rng: np.random.Generator) -> int:
    return int(word) ^ sum(1 << int(b) for b in rng.choice(64, bits, replace=False))


def planted_words(rng: np.random.Generator) -> np.ndarray:
    """300 fingerprints: random ones, near copies at distances 0-12 (direct and mirrored, phash and dhash
    apart by different amounts), byte-identical copies, and 40 rows sharing one phash chunk value (a large
    bucket: it must be sliced like any other)."""
    words = random_words(rng, 300)
    for k in range(100):  # rows 100-199 copy rows 0-99 at a distance, half of them mirrored
        close = words[k, 2:] if k % 2 else words[k, :2]
        words[100 + k, 0] = flip(close[0], k % 13, rng)
        words[100 + k, 1] = flip(close[1], (k * 7) % 13, rng)
    words[200:220] = words[0:20]  # byte-identical
    high = np.uint64(0xFFFF) << np.uint64(48)
    words[220:260, 0] = (words[220:260, 0] & ~high) | (np.uint64(0xABCD) << np.uint64(48))
    return words


def brute_force_pairs(words: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    """Every (i, j), i < j, whose phashes AND dhashes are within max_distance, directly or one mirrored."""
    rows = [[int(w) for w in row] for row in words]

    def close(x: list[int], y: list[int]) -> bool:
        return (x[0] ^ y[0]).bit_count() <= max_distance and (x[1] ^ y[1]).bit_count() <= max_distance

    return {
        (i, j)
        for i, j in itertools.combinations(range(len(rows)), 2)
        if close(rows[i][:2], rows[j][:2]) or close(rows[i][2:], rows[j][:2]) or close(rows[i][:2], rows[j][2:])
    }


def brute_force_groups(n: int, pairs: set[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def as_packed(words: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(words).view(np.uint8).reshape(len(words), 32)


@pytest.mark.parametrize("batch", [7, 1 << 17])
def test_the_compact_search_finds_exactly_the_brute_force_pairs(batch: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hs, "BATCH", batch)  # 7: many slices of lookups and candidates, buckets larger than one
    words = planted_words(np.random.default_rng(24))
    unique = np.unique(words, axis=0)
    expected = brute_force_pairs(unique, MAX_DISTANCE)
    assert len(expected) > 60  # the planted pairs within the distance, at least
    for parts in (3, 4, 6, 11):
        a, b = hs.index_pairs(unique, MAX_DISTANCE, parts)
        assert set(zip(a.tolist(), b.tolist())) == expected, parts
    a, b = hs.all_pairs(unique, MAX_DISTANCE)
    assert set(zip(a.tolist(), b.tolist())) == expected
    # Groups, byte-identical rows included, from packed bytes as from bits; rows not valid join nothing.
    valid = np.ones(len(words), bool)
    valid[5] = False
    keep = np.flatnonzero(valid)
    reference = [[int(keep[i]) for i in g] for g in brute_force_groups(len(keep), brute_force_pairs(words[keep], 10))]
    bits = np.unpackbits(as_packed(words), axis=1).astype(bool)
    for search in ("auto", "index", "all_pairs"):
        assert hs.find_groups(as_packed(words), MAX_DISTANCE, valid, search) == reference, search
        assert hs.find_groups(bits, MAX_DISTANCE, valid, search) == reference, search


def test_the_search_holds_a_bounded_number_of_bytes_per_image():
    """Issue 24: before, one lookup batch of 2M keys held about 100 MB at 37,000 images (3 KB per image)."""
    import tracemalloc

    def peak(n: int) -> int:
        packed = as_packed(random_words(np.random.default_rng(n), n))
        tracemalloc.start()
        try:
            hs.find_pairs(packed, MAX_DISTANCE)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(4_000), peak(20_000)
    assert (large - small) / 16_000 < 400, (small, large)
