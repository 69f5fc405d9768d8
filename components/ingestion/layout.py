"""Labels and layouts: how a tree of files names its classes (and splits), and what a label may be.

A label becomes a folder name under `data/raw` and a class name in the model, so it must be a
name, never a path: no separators, no `..`, no absolute or drive prefix, no control, invisible or
format characters, no Windows reserved names (`CON`, `nul.txt`) or characters, no trailing dot,
bounded length, Unicode NFKC (so `café` typed two ways, or `ｃａｔ`, is one class). Labels that
differ only in case are one folder on case-insensitive file systems: `case_variants` finds them.
A leading `=`/`+`/`-`/`@` is allowed in a label; CSVs neutralise it (components.core.files.write_csv).
Shared by sources (which read labels off trees and tables) and validate (which recognises hidden files).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SYSTEM_NAMES = {"thumbs.db", "desktop.ini", "__macosx", "icon\r"}
MAX_LABEL_CHARS = 128
_DRIVE = re.compile(r"^[A-Za-z]:")
# Bidirectional overrides can make a label read differently from what it is.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_CONTROL = ("Cc", "Cs", "Co", "Cn")  # control, surrogate, private use, unassigned
# Format characters (ZWSP, ZWJ, BOM, tags, bidi), line/paragraph separators, and letters drawn as nothing.
_INVISIBLE_CATEGORIES = ("Cf", "Zl", "Zp")
_INVISIBLE = set("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")
# Windows cannot create these (NTFS: `a:b` is a stream; `<>` is also markup in reports).
_WINDOWS_FORBIDDEN = set('<>:"|?*')
WINDOWS_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{port}{n}" for port in ("COM", "LPT") for n in range(10)
}


class BadLabel(ValueError):
    """A label that is not a plain class name; str() says why."""


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def clean_label(raw: str) -> str:
    """The label as a class name (NFKC, trimmed), or BadLabel saying why it cannot be one.

    A label that is already NFKC and trimmed comes back unchanged (so data versions do not move).
    """
    label = unicodedata.normalize("NFKC", str(raw)).strip()
    if not label:
        raise BadLabel("empty label")
    if len(label) > MAX_LABEL_CHARS:
        raise BadLabel(f"label longer than {MAX_LABEL_CHARS} characters")
    if "/" in label or "\\" in label:
        raise BadLabel("label contains a path separator")
    if label in (".", "..") or label.startswith("."):
        raise BadLabel("label is '.', '..' or a hidden name")
    if _DRIVE.match(label):
        raise BadLabel("label looks like a drive path")
    if any(unicodedata.category(ch) in _CONTROL for ch in label):
        raise BadLabel("label contains control or unassigned characters")
    hidden = next((ch for ch in label if _is_invisible(ch)), None)
    if hidden is not None:
        raise BadLabel(f"label contains an invisible or format character (U+{ord(hidden):04X})")
    if any(ch in _WINDOWS_FORBIDDEN for ch in label):
        raise BadLabel(f"label contains one of {''.join(sorted(_WINDOWS_FORBIDDEN))} (not allowed in Windows names)")
    if label.endswith("."):
        raise BadLabel("label ends with a dot (Windows drops it)")
    if label.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED_NAMES:
        raise BadLabel("label is a reserved Windows device name (CON, NUL, COM1, ...)")
    return label


def _is_invisible(ch: str) -> bool:
    category = unicodedata.category(ch)
    return (
        category in _INVISIBLE_CATEGORIES
        or ch in _INVISIBLE
        or ch in _BIDI_CONTROLS
        or (category == "Zs" and ch != " ")  # NFKC leaves only a few odd spaces (U+1680)
    )


def case_variants(labels: Iterable[str]) -> dict[str, str]:
    """{label: the class it collides with} for labels that differ from another only in case.

    A case-insensitive file system (Windows, macOS) would merge their folders; the first spelling in
    code-point order is the class, and the others are refused.
    """
    first: dict[str, str] = {}
    for label in sorted(set(labels)):
        first.setdefault(_case_key(label), label)
    return {label: first[_case_key(label)] for label in set(labels) if first[_case_key(label)] != label}


def case_variant_reason(label: str, variants: dict[str, str]) -> str:
    return f"label {label!r} differs only in case from the class {variants[label]!r} (one folder on Windows and macOS)"


def _case_key(label: str) -> str:
    return unicodedata.normalize("NFKC", label.casefold())


def safe_relative(rel: str) -> bool:
    """Whether a posix path is plain and relative: no '', '.', '..' parts, no absolute or drive start."""
    parts = rel.split("/")
    return (
        bool(rel)
        and not rel.startswith("/")
        and not _DRIVE.match(rel)
        and "\0" not in rel
        and all(p not in ("", ".", "..") for p in parts)
    )


@dataclass(slots=True)  # one per file while a tree is listed: no per-instance __dict__
class Planned:
    rel: str  # in the source
    label: str  # the class folder's name; once checked, the label (source_trees.plan_entries)
    given_split: str | None
    hidden: bool
    target: str = ""  # the path in raw_dir, once the label is checked


def plan_layout(files: list[str], dirs: list[str]) -> tuple[str, list[Planned], dict[str, int], list[str]]:
    """Read labels (and given splits) off a tree: `<class>/...` or `<split>/<class>/...`.

    Returns (layout, planned files, class folder -> visible file count, ignored paths). Files
    outside class folders (e.g. a LICENSE.txt at the top) and hidden top-level folders are ignored.
    Labels are returned as found; the caller checks them with `clean_label`.
    """
    top_dirs = {p.split("/")[0] for p in dirs} | {p.split("/")[0] for p in files if "/" in p}
    split_layout = any(d.lower() in SPLIT_ALIASES for d in top_dirs)
    depth = 2 if split_layout else 1  # path components before the file that name its class folder
    folders: dict[str, int] = {}
    for d in dirs:
        parts = d.split("/")
        if len(parts) == depth and _usable_folder(parts, split_layout):
            folders.setdefault(d, 0)
    planned, ignored = [], []
    names: dict[str, str] = {}  # one string per class folder name, not one per file
    for rel in files:
        parts = rel.split("/")
        if len(parts) <= depth or not _usable_folder(parts[:depth], split_layout):
            ignored.append(rel)
            continue
        hidden = any(is_hidden(p) for p in parts[depth:])
        folder = "/".join(parts[:depth])
        folders[folder] = folders.get(folder, 0) + (0 if hidden else 1)
        split = SPLIT_ALIASES[parts[0].lower()] if split_layout else None
        planned.append(Planned(rel, names.setdefault(parts[depth - 1], parts[depth - 1]), split, hidden))
    return ("split_folders" if split_layout else "class_folders"), planned, folders, ignored


def _usable_folder(parts: list[str], split_layout: bool) -> bool:
    if any(is_hidden(p) for p in parts):
        return False
    return not split_layout or parts[0].lower() in SPLIT_ALIASES
