"""Near-duplicate pairs by embedding similarity: an inverted-file index of k-means cells, exact cosine inside.

Backbone embeddings (computed by the caller: components/modeling/embeddings.py) see what perceptual
hashes miss, crops and small rotations (benchmarks/results/near_duplicates_embeddings.md). Search:
spherical k-means on a fixed sample gives about sqrt(n) cells; every L2-normalised embedding lives in
its nearest cell and is compared, exactly, with the embeddings living in its `probes` nearest cells;
pairs with cosine >= `min_cosine` are kept. Cost: n x probes x (n / cells) comparisons, about
probes x n^1.5 (not all n^2 / 2 pairs), and memory holds one cell's block of embeddings at a time.

Why not the SimHash it replaces: pooled ReLU features all sit in one orthant, distinct photos at
cosine ~0.35 and same-class ones up to ~0.7, so 64 random hyperplanes separate them badly: 4.7% of all
pairs of flower_photos were SimHash candidates (about 32M at that rate at 37,000 images, where validate
passed 5 GB and 10 CPU minutes before it was stopped).
k-means cells follow the data instead. The search is approximate: a pair whose two embeddings live in
cells that neither one probes is missed. Measured against the exhaustive search (all pairs from cosine
0.85, 8 probes): flower_photos with planted copies, every pair; 37,000 distinct crops of it, 36,952 of
36,955 (benchmarks/results/near_duplicates_embeddings.md has the figures the benchmark writes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np

SEARCH_SEED = 20240924  # fixed: the same embeddings always give the same cells, so the same pairs
KMEANS_ROUNDS = 10
TRAIN_ROWS = 8192  # k-means sample; at least TRAIN_PER_CELL rows per cell
TRAIN_PER_CELL = 16
VISIT_BLOCK = 4096  # probing images compared with one cell at once: memory holds this block, not the data set


class Embeddings(Protocol):
    """Row-ordered embeddings too large to hold at once: read in blocks, or some rows by index."""

    def __len__(self) -> int: ...

    def blocks(self) -> Iterable[np.ndarray]: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...


class ArrayEmbeddings:
    """An in-memory array as `Embeddings` (tests, benchmarks)."""

    def __init__(self, array: np.ndarray, block: int = 4096) -> None:
        self.array, self.block = np.asarray(array, dtype=np.float32), block

    def __len__(self) -> int:
        return len(self.array)

    def blocks(self) -> Iterable[np.ndarray]:
        return (self.array[s : s + self.block] for s in range(0, len(self.array), self.block))

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]


def normalised(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block, dtype=np.float32)
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)


def cell_count(n: int) -> int:
    """About sqrt(n) cells: comparisons inside cells and assignments to cells then cost alike."""
    return max(1, round(n**0.5))


def near_pairs(embeddings: Embeddings, min_cosine: float, probes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, cosine), a < b, sorted, of the pairs with cosine >= `min_cosine` that the index finds.

    Every image is compared with the images living in its `probes` nearest cells; with `probes` at least
    the number of cells (few images) that is every pair, so the result is exact."""
    n = len(embeddings)
    if n < 2:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    centroids = train_centroids(embeddings, cell_count(n))
    nearest = nearest_cells(embeddings, centroids, min(probes, len(centroids)))
    return _pairs_in_cells(embeddings, nearest, min_cosine)


def train_centroids(embeddings: Embeddings, cells: int) -> np.ndarray:
    """(cells, d) unit centroids: spherical k-means on evenly spaced rows, seeded, KMEANS_ROUNDS rounds."""
    n = len(embeddings)
    sample = np.unique(np.linspace(0, n - 1, min(n, max(TRAIN_ROWS, TRAIN_PER_CELL * cells))).astype(np.int64))
    x = normalised(embeddings.take(sample))
    cells = min(cells, len(x))
    centroids = x[np.random.default_rng(SEARCH_SEED).choice(len(x), cells, replace=False)]
    for _ in range(KMEANS_ROUNDS):
        label = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, label, x)
        filled = np.bincount(label, minlength=cells) > 0  # an empty cell keeps its centroid
        centroids[filled] = normalised(sums[filled])
    return centroids


def nearest_cells(embeddings: Embeddings, centroids: np.ndarray, probes: int) -> np.ndarray:
    """(n, probes) int32: each embedding's nearest cells, nearest first (column 0: the cell it lives in)."""
    out = []
    for block in embeddings.blocks():
        similarity = normalised(block) @ centroids.T
        top = np.argpartition(-similarity, probes - 1, axis=1)[:, :probes] if probes < len(centroids) else None
        top = np.tile(np.arange(len(centroids)), (len(block), 1)) if top is None else top
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        out.append(np.take_along_axis(top, order, axis=1).astype(np.int32))
    return np.concatenate(out) if out else np.zeros((0, probes), np.int32)


def _pairs_in_cells(
    embeddings: Embeddings, nearest: np.ndarray, min_cosine: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compare, cell by cell, the images probing the cell with the images living in it."""
    n, probes = nearest.shape
    residents, visitors = _by_cell(nearest[:, 0]), _by_cell(nearest.ravel())
    found_a, found_b, found_cos = [], [], []
    for cell, members in residents.items():
        resident = normalised(embeddings.take(members))
        visiting = visitors[cell] // probes  # rows of the probing images
        for start in range(0, len(visiting), VISIT_BLOCK):
            queries = visiting[start : start + VISIT_BLOCK]
            similarity = normalised(embeddings.take(queries)) @ resident.T
            q, m = np.nonzero(similarity >= min_cosine)
            a, b = queries[q], members[m]
            other = a != b
            found_a.append(np.minimum(a, b)[other])
            found_b.append(np.maximum(a, b)[other])
            found_cos.append(similarity[q, m][other])
    if not found_a:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    codes = np.concatenate(found_a).astype(np.int64) * n + np.concatenate(found_b)
    codes, first = np.unique(codes, return_index=True)  # a pair seen from both sides or in two cells: once
    return codes // n, codes % n, np.concatenate(found_cos)[first]


def _by_cell(cells: np.ndarray) -> dict[int, np.ndarray]:
    """cell -> the positions in `cells` holding it, ascending."""
    order = np.argsort(cells, kind="stable")
    values, starts = np.unique(cells[order], return_index=True)
    return {int(v): part for v, part in zip(values, np.split(order, starts[1:]))}


def exhaustive_pairs(array: np.ndarray, min_cosine: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with a < b of every pair with cosine >= min_cosine, all pairs compared: the reference."""
    unit = normalised(array)
    found_a, found_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, len(unit), block):
        i, j = np.nonzero(unit[start : start + block] @ unit.T >= min_cosine)
        keep = start + i < j
        found_a.append(start + i[keep])
        found_b.append(j[keep])
    return np.concatenate(found_a), np.concatenate(found_b)
