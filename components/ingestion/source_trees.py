"""Sources that are trees of files: a local folder, an extracted archive, a bucket folder.

Each `collect_*` reads the tree's layout (components/ingestion/layout.py: <class>/ or <split>/<class>/ folders),
checks every label, and copies the files into the new raw_dir through components/ingestion/source_copy.py;
what it cannot use is refused by name with the reason (components/ingestion/confine.py).
"""

from __future__ import annotations

import os
import posixpath
import sys
from pathlib import Path
from typing import Any

from components.core.credentials import redact
from components.core.errors import printable
from components.ingestion.archives import ArchiveError, extract_archive
from components.ingestion.confine import (
    Context,
    Entry,
    IngestError,
    Listing,
    Refused,
    file_version,
    inside,
    local_path,
    walk_tree,
)
from components.ingestion.layout import (
    SPLIT_ALIASES,
    BadLabel,
    Planned,
    case_variant_reason,
    case_variants,
    clean_label,
    is_hidden,
    plan_layout,
    safe_relative,
)
from components.ingestion.source_copy import download, materialise
from components.ingestion.urls import is_remote

Plan = tuple[str, list[Planned], dict[str, int], list[str]]


def plan_entries(names: list[str], dirs: list[str], shown_root: str, ctx: Context) -> Plan:
    """Labels off a tree, checked: (layout, planned files with their label and target set, class folders, ignored)."""
    layout, planned, folders, ignored = plan_layout(names, dirs)
    depth = 2 if layout == "split_folders" else 1
    cleaned: dict[str, str | BadLabel] = {}  # class folder name -> its label, checked once per folder
    labelled, bad_folders = [], set()
    for p in planned:
        label = cleaned.get(p.label)
        if label is None:
            try:
                label = cleaned[p.label] = clean_label(p.label)
            except BadLabel as exc:
                label = cleaned[p.label] = exc
        if isinstance(label, BadLabel):
            ctx.refuse(f"{shown_root}/{p.rel}", f"class folder {p.label!r} is not a usable label: {label}")
            bad_folders.add("/".join(p.rel.split("/")[:depth]))
        else:
            labelled.append(p)
    del planned
    folder_labels = {f: _folder_label(f) for f in folders if f not in bad_folders}
    good = {name: label for name, label in cleaned.items() if isinstance(label, str)}
    variants = case_variants(list(good.values()) + [v for v in folder_labels.values() if v])
    # Targets can only collide when a label differs from its folder's name (Unicode normalisation).
    taken: set[str] | None = set() if any(name != label for name, label in good.items()) else None
    kept = []
    for p in labelled:
        label = good[p.label]
        if label in variants:
            ctx.refuse(f"{shown_root}/{p.rel}", case_variant_reason(label, variants))
            continue
        if label == p.label:
            rel = p.rel
        else:
            parts = p.rel.split("/")
            rel = "/".join([*parts[: depth - 1], label, *parts[depth:]])
        if taken is not None:
            if rel in taken:
                ctx.refuse(f"{shown_root}/{p.rel}", "another file has the same name once labels are Unicode-normalised")
                continue
            taken.add(rel)
        p.label, p.target = label, rel
        kept.append(p)
    classes: dict[str, int] = {}
    for folder, label in folder_labels.items():
        if label and label not in variants:
            key = "/".join([*folder.split("/")[:-1], label])
            classes[key] = classes.get(key, 0) + folders[folder]
    return layout, kept, classes, ignored


def _folder_label(folder: str) -> str | None:
    try:
        return clean_label(folder.split("/")[-1])
    except BadLabel:
        return None


def collect_folder(source: str, ctx: Context) -> Listing:
    shown = local_path(source)
    root = shown.resolve()  # the params author names the root; links below it are the data's
    follow = ctx.config.follow_links_within_root
    found, dirs, followed = walk_tree(root, ctx, follow)
    layout, planned, folders, ignored = plan_entries(sorted(found), dirs, str(shown), ctx)
    same_root = str(shown) == str(root)  # then a file's origin is also the path to read: one string for both
    entries = []
    for k, p in enumerate(planned):
        planned[k], file = None, found.pop(p.rel)  # each file's listing is let go as its entry is made
        origin = str(shown / p.rel)
        fetch = file.real or (origin if same_root else str(root / p.rel))
        entries.append(
            Entry(p.target, p.label, p.given_split, origin, fetch, p.hidden, size=file.size, identity=file.identity)
        )
    del planned, found
    entries = materialise(entries, ctx)
    notes = (
        [f"followed {followed} symbolic link(s) that stay inside the source root (ingest.follow_links_within_root)"]
        if followed
        else []
    )
    return Listing("folder", layout, entries, folders, ignored, notes=notes)


def collect_archive(location: str, ctx: Context) -> Listing:
    archive = download(location, ctx) if is_remote(location) else local_path(location)
    version = file_version(os.stat(archive))  # a replaced archive changes this, so its members are inspected again
    extract_root = ctx.staging / "extract"
    print(f"ingest: extracting {printable(archive.name)}", file=sys.stderr)
    try:
        extract_archive(
            archive, extract_root, ctx.config.max_bytes, ctx.config.max_files, ctx.config.max_archive_metadata_bytes
        )
    except ArchiveError as exc:
        raise IngestError(str(exc)) from None
    root, strays = unwrap_single_top(extract_root)
    found, dirs, _ = walk_tree(root, ctx, follow_links=False)  # our own extraction: links were refused already
    layout, planned, folders, ignored = plan_entries(sorted(found), dirs, redact(location), ctx)
    entries = []
    for p in planned:
        src = root / p.rel
        member = src.relative_to(extract_root).as_posix()
        try:
            target = inside(ctx.dest, p.target)
        except Refused as exc:
            ctx.refuse(f"{location}!{member}", str(exc))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)  # our own extracted copy: moving it costs nothing
        entries.append(
            Entry(
                p.target,
                p.label,
                p.given_split,
                f"{redact(location)}!{member}",
                None,
                p.hidden,
                size=found[p.rel].size,
                version=version,
            )
        )
    return Listing("archive", layout, entries, folders, sorted(strays + ignored))


def unwrap_single_top(root: Path) -> tuple[Path, list[str]]:
    """An archive's lone top folder (e.g. flower_photos/) becomes the root; stray top files are ignored."""
    entries = [p for p in root.iterdir() if not is_hidden(p.name)]
    dirs = [p for p in entries if p.is_dir() and not p.is_symlink()]
    if len(dirs) == 1 and dirs[0].name.lower() not in SPLIT_ALIASES:
        strays = [p.name for p in entries if p not in dirs]
        return dirs[0], strays
    return root, []


def collect_remote_folder(url: str, ctx: Context) -> Listing:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise IngestError(f"source {redact(url)}: a URL must name an archive, a CSV/Parquet table, or a bucket folder")
    root = root.rstrip("/")
    names: dict[str, dict[str, Any]] = {}
    dirs: list[str] = []
    for here, subdirs, objects in fs.walk(root, detail=True):
        rel_here = posixpath.relpath(here.rstrip("/"), root)
        dirs += [posixpath.normpath(posixpath.join(rel_here, d)) for d in subdirs]
        for name, info in objects.items():
            rel = posixpath.join(rel_here, name) if rel_here != "." else name
            if not safe_relative(rel) or posixpath.normpath(rel) != rel:
                ctx.refuse(f"{url.rstrip('/')}/{rel}", "object name with '..' or empty parts")
                continue
            names[rel] = info
        if len(names) > ctx.config.max_files:
            break  # materialise refuses the source; stop listing a huge bucket early
    layout, planned, folders, ignored = plan_entries(sorted(names), sorted(set(dirs) - {"."}), url.rstrip("/"), ctx)
    entries = []
    for p in planned:
        info = names[p.rel]
        location = f"{url.rstrip('/')}/{p.rel}"  # as the user spelled the source
        entries.append(
            Entry(
                p.target,
                p.label,
                p.given_split,
                redact(location),
                location,
                p.hidden,
                size=int(info.get("size") or 0),  # declared; the version is the sha256 of the bytes copied
            )
        )
    return Listing("remote-folder", layout, materialise(entries, ctx), folders, ignored)
