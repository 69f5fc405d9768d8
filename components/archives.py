"""Safe extraction of untrusted zip and tar archives.

Nothing an archive holds can write outside the target folder or exhaust the machine:
  - members are checked before anything is written: no absolute or drive paths, no `..`, no links
    (symbolic or hard), no devices or FIFOs (tarfile's `data` filter, plus our own zip checks);
  - `ingest.max_files` members and `ingest.max_bytes` unpacked bytes at most, counted while
    streaming (tar) or from the declared sizes and again while inflating (zip: sizes can lie);
  - tar metadata headers (GNU long names/links, pax extended headers) larger than
    MAX_HEADER_BYTES are refused before tarfile reads them into memory, and sparse members
    (whose maps tarfile also reads whole) are refused outright: an image is never sparse.
"""

from __future__ import annotations

import os
import stat
import tarfile
import time
import zipfile
from pathlib import Path

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


def archive_kind(name: str) -> str | None:
    lowered = name.lower().split("?")[0]
    if lowered.endswith(".zip"):
        return "zip"
    return "tar" if lowered.endswith(ARCHIVE_SUFFIXES) else None


def extract_archive(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    """Unpack a zip or tar archive into dest, refusing anything that could escape it or explode."""
    dest.mkdir(parents=True, exist_ok=True)
    if archive_kind(archive.name) == "zip" or zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, max_bytes, max_members)
    else:
        _extract_tar(archive, dest, max_bytes, max_members)


def _limit_error(archive: Path, what: str, value: int, limit: int, key: str) -> ArchiveError:
    return ArchiveError(
        f"{archive.name}: {what} {value:,} exceeds ingest.{key}={limit:,} "
        "(possible decompression bomb); raise the limit in params.yaml if the archive is trusted"
    )


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized metadata headers and sparse members before reading them.

    tarfile reads a GNU long-name or pax header's whole payload with one read(size) call
    (TarInfo._proc_gnulong/_proc_pax), so a header claiming 100 MB is 100 MB in memory before any
    member is seen. `_proc_member` is tarfile's documented hook for subclasses.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _METADATA_TYPES and self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(
                f"a {self.size:,}-byte metadata header (long name or pax), over the {MAX_HEADER_BYTES:,}-byte limit"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.HeaderError("a sparse member")
        return super()._proc_member(tarfile_)

    def _proc_gnusparse_10(self, *args: object) -> None:  # pax-encoded sparse maps: read whole, unbounded
        raise tarfile.HeaderError("a sparse member")

    def _proc_gnusparse_01(self, *args: object) -> None:
        raise tarfile.HeaderError("a sparse member")

    def _proc_gnusparse_00(self, *args: object) -> None:
        raise tarfile.HeaderError("a sparse member")


def _extract_tar(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    def refuse_unsafe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        if member.issym() or member.islnk():
            raise ArchiveError(f"{archive.name}: member {member.name!r} is a link; links are refused in image archives")
        if member.name.startswith(("/", "\\")) or ":" in member.name.split("/")[0]:
            raise ArchiveError(f"{archive.name}: unsafe member {member.name!r}: absolute path")
        try:
            return tarfile.data_filter(member, path)  # absolute paths, '..', devices, odd modes
        except tarfile.FilterError as exc:
            raise ArchiveError(f"{archive.name}: unsafe member {member.name!r}: {exc}") from None

    try:
        with tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo) as tar:
            count = total = 0
            for member in tar:  # streamed, so a bomb is stopped before it is all read
                count += 1
                total += member.size if member.isfile() else 0
                if count > max_members:
                    raise _limit_error(archive, "member count", count, max_members, "max_files")
                if total > max_bytes:
                    raise _limit_error(archive, "unpacked size", total, max_bytes, "max_bytes")
                refuse_unsafe(member, str(dest))  # check everything before writing anything
            tar.extractall(dest, filter=refuse_unsafe)
    except (tarfile.TarError, EOFError, OSError, RecursionError) as exc:  # a chain of headers recurses
        raise ArchiveError(f"{archive.name}: not a readable archive: {exc}") from None


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


def _extract_zip(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    try:
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
