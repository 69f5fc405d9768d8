"""Labels and layouts: how a tree of files names its classes (and splits), and what a label may be.

A label becomes a folder name under `data/raw` and a class name in the model, so it must be a
name, never a path: no separators, no `..`, no absolute or drive prefix, no control characters,
bounded length, Unicode NFC (so `café` typed two ways is one class). Shared by sources (which
read labels off trees and tables) and validate (which recognises hidden files).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SYSTEM_NAMES = {"thumbs.db", "desktop.ini", "__macosx", "icon\r"}
MAX_LABEL_CHARS = 128
_DRIVE = re.compile(r"^[A-Za-z]:")
# Bidirectional overrides can make a label read differently from what it is.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class BadLabel(ValueError):
    """A label that is not a plain class name; str() says why."""


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def clean_label(raw: str) -> str:
    """The label as a class name (NFC, trimmed), or BadLabel saying why it cannot be one."""
    label = unicodedata.normalize("NFC", str(raw).strip())
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
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") or ch in _BIDI_CONTROLS for ch in label):
        raise BadLabel("label contains control or unassigned characters")
    return label


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


@dataclass
class Planned:
    rel: str
    label: str
    given_split: str | None
    hidden: bool


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
    for rel in files:
        parts = rel.split("/")
        if len(parts) <= depth or not _usable_folder(parts[:depth], split_layout):
            ignored.append(rel)
            continue
        hidden = any(is_hidden(p) for p in parts[depth:])
        folder = "/".join(parts[:depth])
        folders[folder] = folders.get(folder, 0) + (0 if hidden else 1)
        split = SPLIT_ALIASES[parts[0].lower()] if split_layout else None
        planned.append(Planned(rel, parts[depth - 1], split, hidden))
    return ("split_folders" if split_layout else "class_folders"), planned, folders, ignored


def _usable_folder(parts: list[str], split_layout: bool) -> bool:
    if any(is_hidden(p) for p in parts):
        return False
    return not split_layout or parts[0].lower() in SPLIT_ALIASES
