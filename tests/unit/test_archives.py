"""Archive safety (issue 10 item 7): oversized tar metadata headers are refused before they are read
into memory; sparse members are refused; the other limits and escapes are in test_ingest.py."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from components.core.paths import IngestPaths
from components.core.stage_config import IngestConfig, ValidateConfig
from components.ingest import IngestError, run_ingest
from tests.datakit import ingest_params

HUNDRED_MB = 100 * 1024 * 1024
METADATA_CAP = IngestConfig().max_archive_metadata_bytes  # the setting's default


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
    return run_ingest(ingest_params(archive, ValidateConfig(max_pixels=10_000_000)), IngestPaths().under(ws))


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


# --- round 3, item 5: metadata counted in total, headers streamed, zip directories counted first -----


def pax_comment_archive(path: Path, members: int, comment_bytes: int) -> Path:
    """A .tar.gz of `members` empty files, each with a pax header holding a `comment_bytes` comment.

    Each header is under the per-header limit; tarfile keeps every member's pax_headers while it
    keeps the member, so holding all of them costs members x comment_bytes.
    """
    comment = "c" * comment_bytes
    with gzip.open(path, "wb", compresslevel=1) as out:
        for i in range(members):
            info = tarfile.TarInfo(f"data/a/{i:05d}.jpg")
            info.pax_headers = {"comment": comment}
            out.write(info.tobuf(format=tarfile.PAX_FORMAT))
        out.write(b"\0" * tarfile.BLOCKSIZE * 2)
    return path


def _peak(action) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tar_metadata_headers_are_capped_in_total(tmp_path: Path):
    archive = pax_comment_archive(tmp_path / "many.tar.gz", 5000, 60_000)  # 300 MB of headers, ~2 MB on disk
    with pytest.raises(IngestError) as caught:
        _ingest(tmp_path, archive)
    assert "metadata header bytes" in str(caught.value) and "ingest.max_archive_metadata_bytes" in str(caught.value)
    assert not (tmp_path / "ws" / "data" / "raw").exists()


def test_tar_headers_are_streamed_not_all_held(tmp_path: Path):
    from components.ingestion.archives import extract_archive

    archive = pax_comment_archive(tmp_path / "ok.tar.gz", 800, 60_000)  # 48 MB of headers, under the cap
    peak = _peak(lambda: extract_archive(archive, tmp_path / "out", 10**9, 10_000, METADATA_CAP))
    assert len(list((tmp_path / "out" / "data" / "a").iterdir())) == 800
    assert peak < 16 * 1024 * 1024, f"{peak:,} bytes held while extracting"  # old code: ~48 MB


def test_a_large_pax_global_header_total_is_refused(tmp_path: Path):
    with gzip.open(tmp_path / "global.tar.gz", "wb") as out:
        for i in range(3):  # each under the per-header limit, together over it
            info = tarfile.TarInfo("pax_global_header")
            info.type, info.pax_headers = tarfile.XGLTYPE, {f"k{i}": "v" * 30_000}
            out.write(info._create_pax_generic_header(info.pax_headers, tarfile.XGLTYPE, "utf-8"))
        out.write(_header("data/a/x.jpg", tarfile.REGTYPE, 0))
        out.write(b"\0" * tarfile.BLOCKSIZE * 2)
    with pytest.raises(IngestError, match="global headers"):
        _ingest(tmp_path, tmp_path / "global.tar.gz")


def _many_member_zip(path: Path, members: int) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(members):
            zf.writestr(f"data/a/{i:05d}.jpg", b"")
    return path


def _understate_members(path: Path, claimed: int) -> None:
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    struct.pack_into("<2H", data, at + 8, claimed, claimed)  # entries on this disk, entries in total
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("lying", [False, True])
def test_a_zip_member_count_is_checked_before_zipfile_parses_the_directory(tmp_path: Path, monkeypatch, lying: bool):
    from components.ingestion.archives import ArchiveError, extract_archive

    archive = _many_member_zip(tmp_path / "many.zip", 2000)
    if lying:
        _understate_members(archive, 1)  # zipfile parses whatever the directory holds
    parsed = []
    real = zipfile.ZipFile._RealGetContents
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: parsed.append(1) or real(self))
    with pytest.raises(ArchiveError, match="member count 101" if lying else "member count 2,000"):
        extract_archive(archive, tmp_path / "out", 10**9, 100, METADATA_CAP)
    assert not parsed and not (tmp_path / "out" / "data").exists()


def test_a_zip_central_directory_over_the_metadata_cap_is_refused(tmp_path: Path):
    from components.ingestion.archives import ArchiveError, extract_archive

    archive = _many_member_zip(tmp_path / "dir.zip", 50)
    with pytest.raises(ArchiveError, match="central directory bytes"):
        extract_archive(archive, tmp_path / "out", 10**9, 100, max_metadata_bytes=1000)


def test_zip64_and_commented_zips_still_extract(tmp_path: Path, monkeypatch):
    from components.ingestion.archives import extract_archive

    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)  # zipfile writes zip64 end records above it
    archive = _many_member_zip(tmp_path / "z64.zip", 5)
    assert b"PK\x06\x06" in archive.read_bytes()
    with zipfile.ZipFile(archive, "a") as zf:
        zf.comment = b"x" * 1000
    extract_archive(archive, tmp_path / "out", 10**9, 5, METADATA_CAP)
    assert len(list((tmp_path / "out" / "data" / "a").iterdir())) == 5
    with pytest.raises(ValueError, match="member count"):
        extract_archive(archive, tmp_path / "out2", 10**9, 4, METADATA_CAP)
