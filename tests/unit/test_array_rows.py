"""Rows of memory-mapped arrays read in bounded memory (issue 24): stacked reads, released pages, class means."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.core import array_rows
from components.core.array_rows import StackedRows
from components.modeling import drift


def test_stacked_rows_read_like_the_concatenation_in_any_order(tmp_path: Path):
    parts = [np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * i for i in range(3)]
    np.save(tmp_path / "middle.npy", parts[1])
    parts[1] = np.load(tmp_path / "middle.npy", mmap_mode="r")
    source, whole = StackedRows(parts), np.concatenate(parts)
    rows = np.array([11, 0, 5, 4, 7, 3])
    assert source.shape == (12, 3) and len(source) == 12
    np.testing.assert_array_equal(source.take(rows), whole[rows])
    np.testing.assert_array_equal(source.take(np.array([5, 6])), whole[[5, 6]])  # within one part
    got = {(where.start, where.stop): block for where, block in source.chunks(rows, 4)}
    assert list(got) == [(0, 4), (4, 6)]
    np.testing.assert_array_equal(np.concatenate(list(got.values())), whole[rows])
    assert not np.may_share_memory(array_rows.take(parts[1], slice(0, 2)), parts[1])  # a copy, not a view
    with pytest.raises(IndexError):
        source.take(np.array([12]))


def _resident_file_kb() -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith("RssFile:")), None)
    return int(line.split()[1]) if line else None


def test_a_pass_over_a_memory_map_leaves_its_pages_released(tmp_path: Path):
    """Reading every row of a 48 MB map through `take` keeps it out of the resident set; plain reads do not."""
    if _resident_file_kb() is None:
        pytest.skip("no /proc/self/status RssFile here")
    np.save(tmp_path / "x.npy", np.ones((4096, 3072), np.float32))

    def growth_kb(read) -> int:
        x = np.load(tmp_path / "x.npy", mmap_mode="r")
        before = _resident_file_kb()
        for start in range(0, len(x), 512):
            read(x, slice(start, start + 512))
        grown = _resident_file_kb() - before
        del x
        return grown

    plain = growth_kb(lambda x, rows: np.array(x[rows]))
    if plain < 24_000:
        pytest.skip(f"this kernel does not count mapped file pages as resident ({plain} kB)")
    assert growth_kb(array_rows.take) < 8_000  # at most a chunk, not the file


def test_class_means_are_summed_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(array_rows, "CHUNK_ROWS", 3)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 4)).astype(np.float32)
    labels = np.array([0, 2, 0, 2, 2, 0, 0, 2, 2, 0])
    means = drift.class_means(features, labels, 3)
    np.testing.assert_allclose(means[0], features[labels == 0].mean(0), rtol=1e-6)
    np.testing.assert_allclose(means[2], features[labels == 2].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(means[1], np.zeros(4))  # a class without images
