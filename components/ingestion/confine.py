"""Reading a source only inside its root, and writing only inside raw_dir: the checks and the entry types.

The pieces every source kind (components/ingestion/sources.py) shares:
  - `Entry`, `Listing`, `Context`: what a kind lists, what it returns, and what it refuses (by name,
    with the reason: reported, never dropped silently);
  - `regular_file`: only regular files are read; a symlink is followed only when it stays inside
    the source root; devices, FIFOs and sockets are recognised by lstat and never opened; a file
    with more than one name (a hard link, possibly to a file outside the root) is refused unless
    `ingest.allow_hard_links`;
  - `inside`: every target path is resolved within raw_dir before anything is written to it;
  - `check_no_overlap`: a source never lies inside raw_dir, nor raw_dir inside a source folder;
  - `file_version`: what the facts cache keys on (size, mtime, ctime, inode, device): a file swapped
    in with the same size and restored mtime still changes its ctime and usually its inode.
Copying within the caps and downloading are in components/ingestion/source_copy.py.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from components.core.credentials import redact
from components.core.stage_config import IngestConfig
from components.ingestion.layout import safe_relative
from components.ingestion.urls import UrlPolicy


class IngestError(ValueError):
    """A problem with the source a user can fix (missing, unsafe, over a limit or unsupported)."""


class Refused(Exception):
    """One entry refused; str() is the reason shown in the report."""


@dataclass(slots=True)  # one per file, kept for the whole run: no per-instance __dict__
class Entry:
    """One file to bring into raw_dir."""

    rel: str  # posix path inside raw_dir
    label: str
    given_split: str | None  # from the source's layout; None = assign from content
    origin: str  # where it came from (redacted): the manifest's `source` column and the cache key
    fetch: str | None = None  # local path or URL to copy from; None = already in place (or missing, or copied)
    hidden: bool = False
    missing: bool = False
    size: int = 0
    version: str = ""  # with size, identifies unchanged content; '' = unknown (never cached)
    identity: int | None = None  # file_identity when listed: the file opened must be the same


@dataclass
class Listing:
    kind: str  # a SOURCE_KINDS name
    layout: str  # class_folders | split_folders | table
    entries: list[Entry]
    class_folders: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)  # {name, reason}
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    config: IngestConfig
    dest: Path  # the new raw_dir being filled
    staging: Path  # scratch space for extraction
    downloads: Path  # kept between runs: downloaded archives
    raw_dir: Path  # the final raw_dir (for overlap checks)
    refused: list[dict[str, str]] = field(default_factory=list)

    @property
    def policy(self) -> UrlPolicy:
        return UrlPolicy.from_config(self.config)

    def refuse(self, name: str, reason: str) -> None:
        self.refused.append({"name": redact(name), "reason": reason})


# --------------------------------------------------------------------------------------------
# Where a source lies, and raw_dir apart from it


def local_path(source: str) -> Path:
    """A local source as an absolute path (relative ones against cwd)."""
    path = Path(strip_file_scheme(source)).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def strip_file_scheme(location: str) -> str:
    return location[len("file://") :] if location.startswith("file://") else location


def check_no_overlap(source: Path, raw_dir: Path) -> None:
    """Refuse a source inside raw_dir (it would be replaced) or raw_dir inside a source folder."""
    src, raw = source.resolve(), raw_dir.resolve()
    if src == raw or raw in src.parents or (source.is_dir() and src in raw.parents):
        raise IngestError(f"source {source} and raw_dir {raw_dir} overlap: ingest would write into its own source")


# --------------------------------------------------------------------------------------------
# Local files: regular files only, never a link out of the root, never a device or FIFO


def file_version(st: os.stat_result) -> str:
    """What a swap of the file changes: size, mtime and ctime (ns), inode and device."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def file_identity(st: os.stat_result) -> int:
    """(st_dev, st_ino) packed in one int (~40 B kept per file instead of a tuple of two, ~120 B)."""
    return (st.st_dev << 64) | st.st_ino


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(
    path: Path, root: Path | None, follow_links: bool, allow_hard_links: bool = False
) -> tuple[Path, os.stat_result]:
    """(real path, lstat) of a regular file, following a link only inside root; Refused otherwise.

    Nothing is opened here: lstat tells devices and FIFOs apart without touching them.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if not follow_links:
            raise Refused("symbolic link: not followed (ingest.follow_links_within_root is false)")
        # Outside the root first, whether or not the target exists: the reason must not tell which.
        if root is None or not Path(os.path.realpath(path)).is_relative_to(root):
            raise Refused("symbolic link pointing outside the source root")
        try:
            target = Path(os.path.realpath(path, strict=True))
        except (OSError, RuntimeError):
            raise Refused("broken or looping symbolic link") from None
        if not target.is_relative_to(root):  # changed between the two looks
            raise Refused("symbolic link pointing outside the source root")
        path, st = target, os.lstat(target)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{_kind_of(st.st_mode)}, not a regular file: not read")
    check_link_count(st, allow_hard_links)
    return path, st


def check_link_count(st: os.stat_result, allow_hard_links: bool) -> None:
    """Refuse a file with several names: its other name may lie outside the root (a hard link to a
    secret reads like an ordinary file, and nothing tells which name is the original)."""
    if st.st_nlink > 1 and not allow_hard_links:
        raise Refused(
            f"a hard link (the file has {st.st_nlink} names, possibly outside the source): not read "
            "(ingest.allow_hard_links is false)"
        )


def inside(dest: Path, rel: str) -> Path:
    """dest/rel, after checking that it is a plain relative path that resolves inside dest."""
    if not safe_relative(rel):
        raise Refused("its name would be an absolute path or contain '..' or empty parts")
    target = dest / rel
    if not target.resolve().is_relative_to(dest.resolve()):
        raise Refused("its target path would lie outside data/raw")
    return target


class FoundFile(NamedTuple):
    """What a listing keeps of a regular file: a few fields, not its Path and stat result (~1 KB per file)."""

    real: str | None  # the path read when it is not root/rel (a followed link's target)
    size: int
    identity: int  # file_identity: the file opened later must be this one


def walk_tree(root: Path, ctx: Context, follow_links: bool) -> tuple[dict[str, FoundFile], list[str], int]:
    """Regular files (rel -> FoundFile), real folders, and how many links were followed.

    Links to folders are never descended into; anything else that is not a regular file is refused.
    """
    found: dict[str, FoundFile] = {}
    dirs: list[str] = []
    followed = 0
    for here, subdirs, names in os.walk(root):  # followlinks=False: a linked folder is listed, not entered
        rel_here = Path(here).relative_to(root)
        for d in list(subdirs):
            if os.path.islink(os.path.join(here, d)):
                subdirs.remove(d)
                ctx.refuse(str(root / rel_here / d), "symbolic link to a folder: not followed")
            else:
                dirs.append((rel_here / d).as_posix())
        for n in names:
            rel = (rel_here / n).as_posix()
            try:
                real, st = regular_file(root / rel, root, follow_links, ctx.config.allow_hard_links)
            except Refused as exc:
                ctx.refuse(str(root / rel), str(exc))
                continue
            except OSError as exc:
                ctx.refuse(str(root / rel), f"cannot read: {exc.strerror or type(exc).__name__}")
                continue
            linked = real != root / rel
            followed += linked
            found[rel] = FoundFile(str(real) if linked else None, st.st_size, file_identity(st))
    return found, sorted(dirs), followed
