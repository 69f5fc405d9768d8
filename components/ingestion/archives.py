"""Safe extraction of untrusted zip and tar archives.

Nothing an archive holds can write outside the target folder or exhaust the machine:
  - members are checked before anything is written: no absolute or drive paths, no `..`, no links
    (symbolic or hard), no devices or FIFOs (tarfile's `data` filter, plus our own zip checks);
  - `ingest.max_files` members and `ingest.max_bytes` unpacked bytes at most, counted while
    streaming (tar) or from the declared sizes and again while inflating (zip: sizes can lie);
  - archive metadata is bounded: tar metadata headers (GNU long names/links, pax extended headers)
    larger than MAX_HEADER_BYTES each are refused before tarfile reads them into memory, all of them
    together at `ingest.max_archive_metadata_bytes`, pax global headers at MAX_HEADER_BYTES in total
    (tarfile merges them into one dict it copies for every member), and tar headers are streamed,
    never all held (tarfile keeps every header it reads unless told otherwise); a zip's member count
    and central-directory size are read from its end record and its directory is counted before
    zipfile parses it (zipfile holds every entry); sparse tar members (whose maps tarfile also reads
    whole) are refused outright: an image is never sparse.
"""

from __future__ import annotations

import os
import stat
import struct
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CHUNK = 1 << 20
# Real long names and pax records are a few hundred bytes; 64 KiB leaves ample room.
MAX_HEADER_BYTES = 64 * 1024
_METADATA_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class ArchiveError(ValueError):
    """An archive that is unreadable, unsafe, or over a limit; str() names the archive and why."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int  # unpacked bytes (ingest.max_bytes)
    max_members: int  # ingest.max_files
    max_metadata_bytes: int  # tar metadata headers / zip central directory (ingest.max_archive_metadata_bytes)


def archive_kind(name: str) -> str | None:
    lowered = name.lower().split("?")[0]
    if lowered.endswith(".zip"):
        return "zip"
    return "tar" if lowered.endswith(ARCHIVE_SUFFIXES) else None


def extract_archive(archive: Path, dest: Path, max_bytes: int, max_members: int, max_metadata_bytes: int) -> None:
    """Unpack a zip or tar archive into dest, refusing anything that could escape it or explode."""
    dest.mkdir(parents=True, exist_ok=True)
    limits = ArchiveLimits(max_bytes, max_members, max_metadata_bytes)
    if archive_kind(archive.name) == "zip" or zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, limits)
    else:
        _extract_tar(archive, dest, limits)


def _limit_error(archive: Path, what: str, value: int, limit: int, key: str) -> ArchiveError:
    return ArchiveError(
        f"{archive.name}: {what} {value:,} exceeds ingest.{key}={limit:,} "
        "(possible decompression bomb); raise the limit in params.yaml if the archive is trusted"
    )


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized metadata headers and sparse members before reading them.

    tarfile reads a GNU long-name or pax header's whole payload with one read(size) call
    (TarInfo._proc_gnulong/_proc_pax), so a header claiming 100 MB is 100 MB in memory before any
    member is seen. `_proc_member` is tarfile's documented hook for subclasses. Metadata bytes are
    also counted over the whole archive (`_bounded_tarinfo` sets the limit).
    """

    max_metadata_bytes: int  # set by _bounded_tarinfo

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _METADATA_TYPES:
            if self.size > MAX_HEADER_BYTES:
                raise tarfile.HeaderError(
                    f"a {self.size:,}-byte metadata header (long name or pax), over the {MAX_HEADER_BYTES:,}-byte limit"
                )
            self._count_metadata(tarfile_)
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.HeaderError("a sparse member")
        return super()._proc_member(tarfile_)

    def _count_metadata(self, tarfile_: tarfile.TarFile) -> None:
        used = getattr(tarfile_, "_tp_metadata_bytes", 0) + self.size
        global_used = getattr(tarfile_, "_tp_global_bytes", 0) + (self.size if self.type == tarfile.XGLTYPE else 0)
        tarfile_._tp_metadata_bytes, tarfile_._tp_global_bytes = used, global_used
        if used > self.max_metadata_bytes:
            raise _MetadataOverLimit(used, self.max_metadata_bytes)
        if global_used > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"pax global headers of over {MAX_HEADER_BYTES:,} bytes in total")

    def _proc_gnusparse_10(self, *args: object) -> None:  # pax-encoded sparse maps: read whole, unbounded
        raise tarfile.HeaderError("a sparse member")

    def _proc_gnusparse_01(self, *args: object) -> None:
        raise tarfile.HeaderError("a sparse member")

    def _proc_gnusparse_00(self, *args: object) -> None:
        raise tarfile.HeaderError("a sparse member")


class _MetadataOverLimit(tarfile.HeaderError):
    def __init__(self, used: int, limit: int) -> None:
        super().__init__(f"metadata headers of {used:,} bytes")
        self.used, self.limit = used, limit


def _bounded_tarinfo(limit: int) -> type[_BoundedTarInfo]:
    return type("_BoundedTarInfoWithLimit", (_BoundedTarInfo,), {"max_metadata_bytes": limit})


def _streamed(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one at a time; tarfile would otherwise keep every header it has read (tar.members)."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        yield member


def _extract_tar(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    def refuse_unsafe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        if member.issym() or member.islnk():
            raise ArchiveError(f"{archive.name}: member {member.name!r} is a link; links are refused in image archives")
        if member.name.startswith(("/", "\\")) or ":" in member.name.split("/")[0]:
            raise ArchiveError(f"{archive.name}: unsafe member {member.name!r}: absolute path")
        try:
            safe = tarfile.data_filter(member, path)  # absolute paths, '..', devices, odd modes
        except tarfile.FilterError as exc:
            raise ArchiveError(f"{archive.name}: unsafe member {member.name!r}: {exc}") from None
        # Extracted one by one, so a read-only folder must not block the files after it.
        return safe.replace(mode=0o755 if safe.isdir() else 0o644, deep=False)

    def walk(extract: bool) -> None:
        with tarfile.open(archive, "r:*", tarinfo=_bounded_tarinfo(limits.max_metadata_bytes)) as tar:
            count = total = 0
            for member in _streamed(tar):  # streamed, so a bomb is stopped before it is all read
                count += 1
                total += member.size if member.isfile() else 0
                if count > limits.max_members:
                    raise _limit_error(archive, "member count", count, limits.max_members, "max_files")
                if total > limits.max_bytes:
                    raise _limit_error(archive, "unpacked size", total, limits.max_bytes, "max_bytes")
                if extract:
                    tar.extract(member, dest, filter=refuse_unsafe)
                else:
                    refuse_unsafe(member, str(dest))

    try:
        walk(extract=False)  # check everything before writing anything
        walk(extract=True)  # the same checks again: the file is read a second time
    except _MetadataOverLimit as exc:
        raise _limit_error(
            archive, "metadata header bytes", exc.used, exc.limit, "max_archive_metadata_bytes"
        ) from None
    except (tarfile.TarError, EOFError, OSError, RecursionError) as exc:  # a chain of headers recurses
        raise ArchiveError(f"{archive.name}: not a readable archive: {exc}") from None


# --- zip --------------------------------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_ENTRY = struct.Struct("<4s4B4HL2L5H2L")  # one central-directory file header (46 bytes)


def _central_directory(fh: BinaryIO) -> tuple[int, int, int]:
    """(members declared, directory size, directory start) from the end record (zip64 too)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    tail_start = max(0, size - _EOCD.size - 0xFFFF)  # the record, then at most a 64 KiB comment
    fh.seek(tail_start)
    tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise zipfile.BadZipFile("no end of central directory record")
    _, _, _, _, members, cd_size, _, _ = _EOCD.unpack_from(tail, at)
    record = tail_start + at
    if at >= _ZIP64_LOCATOR.size and tail[at - _ZIP64_LOCATOR.size : at - _ZIP64_LOCATOR.size + 4] == b"PK\x06\x07":
        record -= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size  # zipfile reads the zip64 record right before it
        fh.seek(record)
        fields = _ZIP64_EOCD.unpack(fh.read(_ZIP64_EOCD.size))
        if fields[0] != b"PK\x06\x06":
            raise zipfile.BadZipFile("bad zip64 end of central directory record")
        members, cd_size = fields[7], fields[8]
    return members, cd_size, record - cd_size


def _check_zip_directory(archive: Path, limits: ArchiveLimits) -> None:
    """Member count and directory size from the end record, then the entries counted one by one
    (the record can lie; zipfile parses whatever the directory holds), all before zipfile parses it."""
    with open(archive, "rb") as fh:
        declared, cd_size, start = _central_directory(fh)
        if declared > limits.max_members:
            raise _limit_error(archive, "member count", declared, limits.max_members, "max_files")
        if cd_size > limits.max_metadata_bytes:
            raise _limit_error(
                archive, "central directory bytes", cd_size, limits.max_metadata_bytes, "max_archive_metadata_bytes"
            )
        if start < 0:
            raise zipfile.BadZipFile("the central directory lies before the start of the file")
        fh.seek(start)
        count = consumed = 0
        while consumed < cd_size:
            head = fh.read(_CENTRAL_ENTRY.size)
            if len(head) < _CENTRAL_ENTRY.size or head[:4] != b"PK\x01\x02":
                raise zipfile.BadZipFile("bad central directory entry")
            name_len, extra_len, comment_len = _CENTRAL_ENTRY.unpack(head)[12:15]
            fh.seek(name_len + extra_len + comment_len, os.SEEK_CUR)
            consumed += _CENTRAL_ENTRY.size + name_len + extra_len + comment_len
            count += 1
            if count > limits.max_members:
                raise _limit_error(archive, "member count", count, limits.max_members, "max_files")


def _zip_target(dest: Path, archive: Path, name: str) -> Path:
    clean = name.replace("\\", "/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if clean.startswith("/") or (parts and ":" in parts[0]) or ".." in parts or "\0" in clean:
        raise ArchiveError(
            f"{archive.name}: unsafe member {name!r}: an absolute path or '..' would write outside the target"
        )
    target = dest.joinpath(*parts) if parts else dest
    if not target.resolve().is_relative_to(dest.resolve()):
        raise ArchiveError(f"{archive.name}: unsafe member {name!r}: outside the target")
    return target


def _extract_zip(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    max_bytes, max_members = limits.max_bytes, limits.max_members
    try:
        _check_zip_directory(archive, limits)
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise _limit_error(archive, "member count", len(infos), max_members, "max_files")
            declared = sum(i.file_size for i in infos)
            if declared > max_bytes:
                raise _limit_error(archive, "unpacked size", declared, max_bytes, "max_bytes")
            targets = [_zip_target(dest, archive, i.filename) for i in infos]  # check all before writing
            for info in infos:
                kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0  # 3: Unix
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    what = "a link" if kind == stat.S_IFLNK else "not a regular file"
                    raise ArchiveError(
                        f"{archive.name}: member {info.filename!r} is {what}; "
                        "only files and folders are accepted in image archives"
                    )
            written = 0
            for info, target in zip(infos, targets):
                written = _write_zip_member(zf, info, target, archive, written, max_bytes)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise ArchiveError(f"{archive.name}: not a readable archive: {exc}") from None


def _write_zip_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path, written: int, max_bytes: int
) -> int:
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return written
    target.parent.mkdir(parents=True, exist_ok=True)
    member_bytes = 0
    with zf.open(info) as src, open(target, "xb") as dst:  # 'x': a repeated name cannot overwrite
        while chunk := src.read(CHUNK):
            member_bytes += len(chunk)
            written += len(chunk)
            # Declared sizes can lie: count what is actually inflated.
            if member_bytes > info.file_size or written > max_bytes:
                raise _limit_error(archive, "unpacked size", written, max_bytes, "max_bytes")
            dst.write(chunk)
    mtime = time.mktime(info.date_time + (0, 0, -1))
    os.utime(target, (mtime, mtime))  # stable mtimes keep the ingest cache valid across extractions
    return written
