"""Rows of large 2-D arrays (the feature cache's .npy memory maps) read in bounded memory (issue 24).

A memory map's pages count in the process's resident set once touched, and stay there until the kernel
wants them back: one pass over a 190 MB feature file leaves 190 MB resident. `take` copies the rows asked
for and then hands the map's pages back (madvise MADV_DONTNEED: a later read faults them in again from the
page cache, so nothing is read twice from disk), so a pass holds one chunk, not the file. `StackedRows`
reads several arrays (train, val and test features) as one, without concatenating them.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence

import numpy as np

CHUNK_ROWS = 4096  # rows per read in a pass: 21 MB of 1,280 float32 features (fewer, larger BLAS calls)


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The memory map under `array` (a np.load(mmap_mode=...) array or a view of one), else None."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def release(array: np.ndarray) -> None:
    """Drop the pages of `array`'s memory map from this process (read-only maps: nothing is lost)."""
    mapping = _mapping(array)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED") and not mapping.closed:
        mapping.madvise(mmap.MADV_DONTNEED)


def take(array: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """A copy of `array[rows]`; a memory map's pages are released after the copy."""
    block = np.asarray(array[rows])
    if np.may_share_memory(block, array):  # a slice is a view: copy it (fancy indexing already copied)
        block = block.copy()
    release(array)
    return block


class StackedRows:
    """Several arrays with the same row shape read as their concatenation, a few rows at a time."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts or len({p.shape[1:] for p in parts}) != 1:
            raise ValueError("StackedRows needs at least one array, all with the same row shape")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = np.result_type(*self.parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by their index in the concatenation, in the order given (a copy)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        if len(rows) and part_of[0] == part_of[-1] and (part_of == part_of[0]).all():  # one part: one copy
            return take(self.parts[part_of[0]], rows - self.starts[part_of[0]]).astype(self.dtype, copy=False)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for i, part in enumerate(self.parts):
            chosen = part_of == i
            if chosen.any():
                out[chosen] = take(part, rows[chosen] - self.starts[i])
        return out

    def chunks(self, rows: np.ndarray, size: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """(positions in `rows`, those rows' values) for consecutive chunks of at most `size` rows (CHUNK_ROWS)."""
        size = size or CHUNK_ROWS
        for start in range(0, len(rows), size):
            where = slice(start, min(start + size, len(rows)))
            yield where, self.take(rows[where])


def stacked(features: np.ndarray | StackedRows) -> StackedRows:
    """`features` as StackedRows (an in-memory array is one part)."""
    return features if isinstance(features, StackedRows) else StackedRows([features])
