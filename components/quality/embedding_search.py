"""Near-duplicate pairs by embedding similarity: SimHash candidates, checked by exact cosine similarity.

Backbone embeddings (computed by the caller: components/modeling/embeddings.py) see what perceptual
hashes miss, crops and small rotations (benchmarks/results/near_duplicates_embeddings.md). Search:
every L2-normalised embedding gets a 64-bit SimHash (signs of 64 random projections, fixed seed; two
vectors at angle theta differ in each bit with probability theta / pi), pairs within `max_bits` of
each other are found by the exact multi-index Hamming search of components/quality/hamming_search.py
(sub-quadratic), and each candidate is kept when its exact cosine similarity is at least `min_cosine`.
The SimHash step is probabilistic: a pair exactly at `min_cosine` is missed with probability
`miss_probability(min_cosine, max_bits)`; closer pairs, as copies are, less. near_duplicates searches
from `candidate_cosine` (0.85, radius 14: 5e-4 there, 3e-5 at 0.877 where the lowest planted crop sits).
Embeddings are read a block at a time: memory holds the 64-bit hashes, not the embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import acos, comb, pi
from typing import Protocol

import numpy as np

from components.quality import hamming_search

SIMHASH_BITS = 64
SIMHASH_SEED = 20240924  # fixed: the same embeddings always give the same hashes
# Independent SimHashes per embedding, each searched at `max_bits`: a pair is a candidate when any table
# finds it. Pooled ReLU features are all positive, so distinct photos sit at cosine ~0.35, only ~24 bits
# apart: one 64-bit hash at a radius wide enough for cosine 0.9 pairs made 8% of all pairs candidates
# on flower_photos; four tables at a narrower radius miss less and check about a tenth of that.
SIMHASH_TABLES = 4
VERIFY_BLOCK = 4096  # candidate pairs whose embeddings are read at once


class Embeddings(Protocol):
    """Row-ordered embeddings too large to hold at once: read in blocks, or a few rows by index."""

    def blocks(self) -> Iterable[np.ndarray]: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...


class ArrayEmbeddings:
    """An in-memory array as `Embeddings` (tests, benchmarks)."""

    def __init__(self, array: np.ndarray, block: int = 4096) -> None:
        self.array, self.block = np.asarray(array, dtype=np.float32), block

    def blocks(self) -> Iterable[np.ndarray]:
        return (self.array[s : s + self.block] for s in range(0, len(self.array), self.block))

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]


def normalised(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block, dtype=np.float32)
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)


def simhash(embeddings: Embeddings, table: int = 0) -> np.ndarray:
    """(n,) uint64: the SimHash of each normalised embedding in one table (its own random planes), block by block."""
    words, planes = [], None
    for block in embeddings.blocks():
        if planes is None:
            rng = np.random.default_rng([SIMHASH_SEED, table])
            planes = rng.standard_normal((block.shape[1], SIMHASH_BITS)).astype(np.float32)
        bits = normalised(block) @ planes > 0
        words.append(np.packbits(bits, axis=1).view(np.uint64).ravel())
    return np.concatenate(words) if words else np.zeros(0, np.uint64)


def miss_probability(min_cosine: float, max_bits: int, tables: int = SIMHASH_TABLES) -> float:
    """Chance that two embeddings at exactly `min_cosine` are more than `max_bits` apart in every table."""
    p = acos(min(1.0, max(-1.0, min_cosine))) / pi
    within = sum(comb(SIMHASH_BITS, k) * p**k * (1 - p) ** (SIMHASH_BITS - k) for k in range(max_bits + 1))
    return (1.0 - within) ** tables


def cosine_of(embeddings: Embeddings, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact cosine similarity of the row pairs (a[k], b[k])."""
    out = np.zeros(len(a), np.float32)
    for s in range(0, len(a), VERIFY_BLOCK):
        left = normalised(embeddings.take(a[s : s + VERIFY_BLOCK]))
        right = normalised(embeddings.take(b[s : s + VERIFY_BLOCK]))
        out[s : s + VERIFY_BLOCK] = np.einsum("ij,ij->i", left, right)
    return out


def near_pairs(
    embeddings: Embeddings, min_cosine: float, max_bits: int, parts: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, cosine), a < b, of every pair within `max_bits` in some SimHash table and with cosine >= `min_cosine`.

    `parts` forces the multi-index with that many chunks; by default hamming_search's cost model picks
    the index or, for few images, all pairs (the same pairs either way)."""
    found_a, found_b = [], []
    for table in range(SIMHASH_TABLES):
        a, b = _candidates(simhash(embeddings, table), max_bits, parts)
        found_a.append(a)
        found_b.append(b)
    if not found_a or not sum(map(len, found_a)):
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    pairs = np.unique(np.stack([np.concatenate(found_a), np.concatenate(found_b)], axis=1), axis=0)
    a, b = pairs[:, 0], pairs[:, 1]
    cosine = cosine_of(embeddings, a, b)
    keep = cosine >= min_cosine
    return a[keep], b[keep], cosine[keep]


def _candidates(words: np.ndarray, max_bits: int, parts: int | None) -> tuple[np.ndarray, np.ndarray]:
    if len(words) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    # hamming_search compares (phash, dhash, mirror phash, mirror dhash) words: one SimHash fills all four.
    words = np.repeat(words[:, None], 4, axis=1)
    plan = parts or hamming_search.search_plan(len(words), max_bits)
    if plan == "all_pairs":  # the cost model's choice for few images: comparing all is cheaper than any index
        return hamming_search.all_pairs(words, max_bits)
    return hamming_search.index_pairs(words, max_bits, int(plan))


def exhaustive_pairs(array: np.ndarray, min_cosine: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with a < b of every pair with cosine >= min_cosine, all pairs compared: the reference."""
    unit = normalised(array)
    similarity = unit @ unit.T
    a, b = np.nonzero(np.triu(similarity >= min_cosine, k=1))
    return a, b
