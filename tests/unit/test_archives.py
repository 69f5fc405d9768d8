"""Archive safety (issue 10 item 7): oversized tar metadata headers are refused before they are read
into memory; sparse members are refused; the other limits and escapes are in test_ingest.py."""

from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from components.ingest import IngestError, run_ingest
from tests.datakit import ingest_config

HUNDRED_MB = 100 * 1024 * 1024


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _padded(size: int) -> int:
    return -size % tarfile.BLOCKSIZE


def metadata_bomb(path: Path, kind: bytes, size: int) -> Path:
    """A .tar.gz whose first header is a `kind` metadata header (GNU long name, pax) of `size` bytes.

    Compressed it is ~0.1% of `size`; tarfile would read all `size` bytes at once to parse it.
    """
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(_header("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "pax", kind, size))
        block = b"a" * (1 << 20)
        left = size
        while left:
            out.write(block[: min(left, len(block))])
            left -= min(left, len(block))
        out.write(b"\0" * _padded(size))
        out.write(_header("data/a/x.jpg", tarfile.REGTYPE, 0))
        out.write(b"\0" * tarfile.BLOCKSIZE * 2)
    return path


def _ingest(tmp_path: Path, archive: Path):
    ws = tmp_path / "ws"
    return run_ingest(
        ingest_config(archive),
        42,
        ws / "data" / "raw",
        ws / "data" / "manifest.csv",
        ws / "reports" / "ingest.json",
        10_000_000,
    )


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE])
def test_a_100mb_metadata_header_is_refused_before_it_is_read_into_memory(tmp_path: Path, kind: bytes):
    archive = metadata_bomb(tmp_path / "bomb.tar.gz", kind, HUNDRED_MB)
    tracemalloc.start()
    try:
        with pytest.raises(IngestError) as caught:
            _ingest(tmp_path, archive)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, f"{peak:,} bytes allocated while reading the header"
    assert "metadata header" in str(caught.value)
    assert not (tmp_path / "ws" / "data" / "raw").exists()


def test_normal_long_names_still_extract(tmp_path: Path):
    from tests.conftest import write_image

    long_name = "c" * 150  # over tar's 100-character name field: a GNU long-name header
    image = write_image(tmp_path / "img.jpg", seed=1).read_bytes()
    with tarfile.open(tmp_path / "ok.tgz", "w:gz", format=tarfile.GNU_FORMAT) as tar:
        for i in range(2):
            info = tarfile.TarInfo(f"data/cls/{long_name}_{i}.jpg")
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))
    result = _ingest(tmp_path, tmp_path / "ok.tgz")
    assert result.files == 2 and (result.raw_dir / "cls" / f"{long_name}_0.jpg").is_file()


def test_sparse_members_are_refused(tmp_path: Path):
    with gzip.open(tmp_path / "sparse.tar.gz", "wb") as out:
        out.write(_header("data/a/x.jpg", tarfile.GNUTYPE_SPARSE, 0))
        out.write(b"\0" * tarfile.BLOCKSIZE * 2)
    with pytest.raises(IngestError, match="sparse"):
        _ingest(tmp_path, tmp_path / "sparse.tar.gz")
