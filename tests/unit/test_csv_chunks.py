"""CSV files written and read a chunk of rows at a time (issue 24) are the files and frames of one pass."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from components.core import files


def one_pass_csv(frame: pd.DataFrame) -> str:
    """write_csv before issue 24: the whole frame neutralised and written at once."""
    safe = frame.copy()
    for column in safe.columns:
        if not files._numeric(safe[column]):
            safe[column] = safe[column].map(files.neutralise_formula)
    out = io.StringIO()
    safe.to_csv(out, index=False, lineterminator="\n")
    return out.getvalue()


def one_pass_frame(path: Path, **kwargs) -> pd.DataFrame:
    frame = pd.read_csv(path, **kwargs)
    for column in frame.columns:
        if not files._numeric(frame[column]):
            frame[column] = frame[column].map(files.restore_formula)
    return frame


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [f"data/raw/a/{i}.jpg" for i in range(10)],
            "label": ["=SUM(1,2)", "+1", "-2", "@x", "'=quoted", "plain", "", "b", "c", "d"],
            "bytes": list(range(10)),
            "ratio": [0.5 * i for i in range(10)],
            "flag": [True, False] * 5,
        }
    )


@pytest.mark.parametrize("rows", [1, 3, 4096])
def test_chunked_csv_files_and_frames_equal_one_pass(table: pd.DataFrame, tmp_path: Path, monkeypatch, rows: int):
    monkeypatch.setattr(files, "CSV_CHUNK_ROWS", rows)
    path = files.write_csv(table, tmp_path / "t.csv")
    assert path.read_text() == one_pass_csv(table)
    kwargs = {"dtype": {"label": str}, "keep_default_na": False}
    read = files.read_csv(path, **kwargs)
    pd.testing.assert_frame_equal(read, one_pass_frame(path, **kwargs))
    pd.testing.assert_frame_equal(read, table)  # the formulas come back as they were


def test_chunks_typed_apart_are_parsed_at_once_and_an_empty_table_reads(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(files, "CSV_CHUNK_ROWS", 2)
    path = tmp_path / "t.csv"
    path.write_text("path,width\na,1\nb,2\nc,\nd,4\n")  # the second chunk has a blank width: text, not numbers
    kwargs = {"keep_default_na": False}
    pd.testing.assert_frame_equal(files.read_csv(path, **kwargs), one_pass_frame(path, **kwargs))
    path.write_text("path,width\n")
    empty = files.read_csv(path, **kwargs)
    assert list(empty.columns) == ["path", "width"] and empty.empty
    files.write_csv(empty, tmp_path / "e.csv")
    assert (tmp_path / "e.csv").read_text() == one_pass_csv(empty)


def test_the_data_version_without_a_tuple_per_row_is_the_records_version(monkeypatch):
    """Rows sorted by Arrow hash to the digest of Python's sorted records: prefixes, control characters,
    accents and astral characters, paths outside raw_dir, and rows whose relative paths coincide (ties
    broken by label, split, sha256)."""
    from components.core.hashing import records_version
    from components.quality import validation_inputs as vi

    monkeypatch.setattr(vi, "ROWS_AT_ONCE", 3)
    paths = ["raw/a", "raw/a\x01", "raw/a/b", "raw/ab", "raw/é", "raw/日本", "raw/😀", "raw/./a", "other/z", "raw/\tx"]
    frame = pd.DataFrame(
        {
            "path": paths,
            "label": ["b", "a", "c", "a", "é", "a", "a", "a", "z", "x"],
            "split": ["train", "val", "test", "train", "val", "test", "train", "val", "train", "test"],
            "sha256": [f"{i:064x}" for i in range(len(paths))],
        }
    )
    for raw_dir in ("raw", "raw/", None):
        assert vi.data_version(frame, raw_dir) == records_version(vi.relative_records(frame, raw_dir)), raw_dir
    assert vi.data_version(frame.iloc[:0], "raw") == records_version([])
