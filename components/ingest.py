"""Ingest: bring a labelled image source into `data/raw` and describe every file in the manifest.

Sources (params `ingest.source`, kinds in components/sources.py): a folder of class sub-folders, a
folder already split into `train/ val/ test/` (missing splits are carved from train), a CSV/Parquet
table of (path or URI, label[, split]), a `.zip`/`.tar.gz`/`.tgz` archive, local or by URL, or a
bucket folder through fsspec (`s3://`, `gs://`). The source is only read, never changed, and only
inside its own root (components/confine.py); what a source offers but may not deliver is listed
in the report's `refused`.

Every file is hashed (sha256) and, in an allowed format (`validate.allowed_formats`), fully decoded
through the guarded loader (components/images.py) in a process pool; results are cached beside
`raw_dir` by (source, size, mtime, ctime, inode) so a rerun on an unchanged source recomputes
nothing. Splits come from a hash of each image's bytes: adding images never moves an existing one,
and byte-identical files always share a split. Undecodable, hidden, non-image files and images in
other formats stay in the manifest with an `error` so that validate can report them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
from filelock import FileLock

from components import errors, files, runtime
from components.config import ParamsError, load_params
from components.contracts import SPLITS, IngestReport, write_manifest
from components.credentials import redact
from components.hashing import records_version
from components.images import ImageLimits, UnusableImage, inspect_image
from components.progress import progress
from components.sources import (
    MAX_REFUSALS_LISTED,
    Entry,
    IngestError,
    Listing,
    check_no_overlap,
    collect_source,
    local_path,
)
from components.stage_config import IngestConfig, SplitFractions, ValidateConfig
from components.urls import is_remote

CACHE_DIRNAME = ".ingest_cache"
CHUNK = 1 << 20
# Below this many files a process pool costs more to start than it saves.
MIN_FILES_FOR_POOL = 64

__all__ = ["IngestError", "IngestResult", "run_ingest", "inspect_file", "assign_split", "main"]


@dataclass(frozen=True)
class IngestResult:
    raw_dir: Path
    manifest_path: Path
    report_path: Path
    files: int
    images: int  # files that decoded
    unreadable: int
    refused: int  # entries the source offered that were not read (see the report's `refused`)
    bytes: int
    counts: dict[str, dict[str, int]]  # split -> label -> decodable images
    data_version: str
    computed: int  # files hashed and decoded in this run
    cached: int  # files whose facts came from the cache
    workers: int
    seconds: float
    notes: list[str]


# --------------------------------------------------------------------------------------------
# Per-file facts (runs in worker processes)


def inspect_file(path: str, limits: ImageLimits) -> dict[str, Any]:
    """sha256, size and a full decode (components.images) of one copied file; `error` says why it is unusable."""
    digest, size, kept = hashlib.sha256(), 0, bytearray()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise IngestError(f"{path}: not a regular file")  # raw_dir is ours: this is a bug, not bad data
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if size <= limits.max_bytes:
                kept += chunk
    facts: dict[str, Any] = {
        "sha256": digest.hexdigest(),
        "bytes": size,
        "format": "",
        "mode": "",
        "width": 0,
        "height": 0,
        "error": "",
    }
    if size == 0:
        facts["error"] = "empty file (0 bytes)"
    elif size > limits.max_bytes:
        facts["error"] = f"{size:,} bytes exceeds validate.max_image_bytes={limits.max_bytes:,}"
    else:
        try:
            found = inspect_image(bytes(kept), limits)
        except UnusableImage as exc:
            facts["error"] = exc.reason
        else:
            facts.update(format=found.format, mode=found.mode, width=found.width, height=found.height)
            if found.note:
                facts["note"] = found.note  # usable, but its EXIF orientation could not be applied
    return facts


def _inspect_star(args: tuple[str, ImageLimits]) -> dict[str, Any]:
    return inspect_file(*args)


# --------------------------------------------------------------------------------------------
# Splits


def split_position(sha256: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the file's bytes."""
    return int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest(), 16) / 2**256


def assign_split(sha256: str, seed: int, fractions: SplitFractions, among: Sequence[str] = SPLITS) -> str:
    """Split of a file from its content hash, with `fractions` renormalised over `among`."""
    weights = [(name, getattr(fractions, name)) for name in among]
    total = sum(w for _, w in weights)
    u = split_position(sha256, seed)
    edge = 0.0
    for name, weight in weights:
        edge += weight / total
        if u < edge:
            return name
    return weights[-1][0]


# --------------------------------------------------------------------------------------------
# Cache of per-file facts


class FactsCache:
    """Facts of files keyed by (origin, size, version); valid only for the same Pillow and image limits.

    A local file's version is its size, mtime, ctime, inode and device (sources.file_version): a file
    swapped in with the same size and a restored mtime still gets a new ctime, so it is inspected again.
    """

    def __init__(self, path: Path, limits: ImageLimits) -> None:
        self.path = path
        self.signature = {
            "pillow": PIL.__version__,
            "max_pixels": limits.max_pixels,
            "max_image_bytes": limits.max_bytes,
            "formats": list(limits.formats or ()),
            "schema": 4,  # 3: only allowed formats decoded; embedded images checked. 4: upright (EXIF) sizes
        }
        self.files: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                stored = files.read_json(path)
            except (OSError, json.JSONDecodeError):
                stored = {}  # a damaged cache only costs a recompute
            if isinstance(stored, dict) and stored.get("signature") == self.signature:
                self.files = stored.get("files", {})

    def get(self, entry: Entry) -> dict[str, Any] | None:
        hit = self.files.get(entry.origin)
        if hit and entry.version and hit["size"] == entry.size and hit["version"] == entry.version:
            return hit["facts"]
        return None

    def save(self, entries: list[Entry], facts: dict[str, dict[str, Any]]) -> None:
        """Keep only the current files, so the cache never outgrows the source."""
        known = {
            e.origin: {"size": e.size, "version": e.version, "facts": facts[e.origin]}
            for e in entries
            if e.version and e.origin in facts
        }
        files.write_json(self.path, {"signature": self.signature, "files": known})


def resolve_workers(workers: int) -> int:
    return workers or runtime.available_cores()


def inspect_entries(
    entries: list[Entry], root: Path, cache: FactsCache, workers: int, limits: ImageLimits
) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Facts for every present entry: from the cache when unchanged, else computed in a pool.

    Returns (facts by origin, files computed, processes used).
    """
    facts: dict[str, dict[str, Any]] = {}
    todo = []
    for e in entries:
        if e.missing:
            continue
        cached = cache.get(e)
        if cached is not None:
            facts[e.origin] = cached
        else:
            todo.append(e)
    jobs = [(str(root / e.rel), limits) for e in todo]
    used = min(workers, len(jobs)) if len(jobs) >= MIN_FILES_FOR_POOL else 1
    bar = dict(total=len(jobs), desc="ingest: hash+decode", unit="file")
    if used > 1:
        with ProcessPoolExecutor(max_workers=used) as pool:
            chunks = max(1, len(jobs) // (used * 16))
            results = list(progress(pool.map(_inspect_star, jobs, chunksize=chunks), **bar))
    else:
        results = [inspect_file(*job) for job in progress(jobs, **bar)]
    facts.update((e.origin, r) for e, r in zip(todo, results))
    return facts, len(jobs), used if jobs else 0


# --------------------------------------------------------------------------------------------
# Rows, report, entry point


def build_rows(
    entries: list[Entry], facts: dict[str, dict[str, Any]], raw_dir: Path, seed: int, fractions: SplitFractions
) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifest rows (sorted by path) with splits; notes say which splits were carved from train, and which images'
    EXIF orientation could not be read."""
    given = {e.given_split for e in entries if e.given_split}
    missing = [s for s in SPLITS if s not in given]
    notes = []
    carve = bool(given) and "train" in given and bool(missing)
    if carve:
        notes.append(
            f"the source has no {'/'.join(missing)} split: carved from train by content hash "
            f"({', '.join(f'{s}={getattr(fractions, s):g}' for s in ['train', *missing])}, renormalised)"
        )
    elif given and missing:
        notes.append(f"the source has no train split; {'/'.join(missing)} left empty")
    rows = []
    for e in entries:
        f = facts.get(e.origin) or {
            "sha256": "",
            "bytes": 0,
            "format": "",
            "mode": "",
            "width": 0,
            "height": 0,
            "error": f"source file not found: {e.origin}",
        }
        error = "hidden or system file (e.g. .DS_Store), not an image" if e.hidden else f["error"]
        key = f["sha256"] or hashlib.sha256(e.origin.encode()).hexdigest()
        split = e.given_split
        if split is None:
            split = assign_split(key, seed, fractions)
        elif split == "train" and carve:
            split = assign_split(key, seed, fractions, among=["train", *missing])
        rows.append(
            {
                "path": (raw_dir / e.rel).as_posix(),
                "label": e.label,
                "split": split,
                "sha256": f["sha256"],
                "bytes": f["bytes"],
                "width": f["width"],
                "height": f["height"],
                "format": f["format"],
                "mode": f["mode"],
                "source": e.origin,
                "error": error,
                "_rel": e.rel,
            }
        )
    rows.sort(key=lambda r: r["path"])
    unoriented = sorted(e.rel for e in entries if (facts.get(e.origin) or {}).get("note"))
    if unoriented:
        notes.append(
            f"{len(unoriented)} image(s) with an unreadable EXIF orientation are used as stored, perhaps on their "
            f"side (e.g. {unoriented[0]}): rewrite them upright, or fix their orientation tag"
        )
    return rows, notes


def count_images(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for r in rows:
        if not r["error"]:
            counts[r["split"]][r["label"]] = counts[r["split"]].get(r["label"], 0) + 1
    return {s: dict(sorted(c.items())) for s, c in counts.items()}


def run_ingest(
    config: IngestConfig,
    seed: int,
    raw_dir: str | Path,
    manifest_path: str | Path,
    report_path: str | Path,
    max_pixels: int,
    max_image_bytes: int | None = None,
    allowed_formats: Sequence[str] | None = None,
) -> IngestResult:
    """Copy the source into raw_dir, inspect every file, write the manifest and the report.

    `max_pixels`, `max_image_bytes` and `allowed_formats` are validate's (one guard for every decode);
    None = its default. Files in other formats are not decoded: their `error` names the format.
    """
    started = time.perf_counter()
    raw_dir, manifest_path, report_path = Path(raw_dir), Path(manifest_path), Path(report_path)
    if max_image_bytes is None:
        max_image_bytes = ValidateConfig.model_fields["max_image_bytes"].default
    if allowed_formats is None:
        allowed_formats = ValidateConfig().allowed_formats
    formats = tuple(f.upper() for f in allowed_formats)
    limits = ImageLimits(max_bytes=max_image_bytes, max_pixels=max_pixels, formats=formats)
    if not is_remote(config.source):
        check_no_overlap(local_path(config.source), raw_dir)  # before anything is written next to raw_dir
    cache_dir = raw_dir.parent / CACHE_DIRNAME  # beside, not inside, the DVC-tracked raw_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    workers = resolve_workers(config.workers)
    with FileLock(cache_dir / "lock"):
        for leftover in cache_dir.glob("staging-*"):  # a killed run's: we hold the lock, so none is in use
            shutil.rmtree(leftover, ignore_errors=True)
        cache = FactsCache(cache_dir / "files.json", limits)
        with (
            files.atomic_dir(raw_dir) as new_raw,
            tempfile.TemporaryDirectory(dir=cache_dir, prefix="staging-") as staging,
        ):
            listing = collect_source(config, new_raw, Path(staging), cache_dir / "downloads", raw_dir)
            if not listing.entries:
                raise IngestError(
                    f"source {redact(config.source)!r}: no usable files in class folders (expected "
                    f"<class>/<image> or <split>/<class>/<image>); {len(listing.refused)} refused"
                    + "".join(
                        f"\n  - {errors.printable(r['name'])}: {errors.printable(r['reason'])}"
                        for r in listing.refused[:10]
                    )
                )
            facts, computed, used = inspect_entries(listing.entries, new_raw, cache, workers, limits)
            rows, notes = build_rows(listing.entries, facts, raw_dir, seed, config.split)
        write_manifest(rows, manifest_path)
        cache.save(listing.entries, facts)
    seconds = time.perf_counter() - started
    result = IngestResult(
        raw_dir=raw_dir,
        manifest_path=manifest_path,
        report_path=report_path,
        files=len(rows),
        images=sum(1 for r in rows if not r["error"]),
        unreadable=sum(1 for r in rows if r["error"]),
        refused=len(listing.refused),
        bytes=sum(int(r["bytes"]) for r in rows),
        counts=count_images(rows),
        data_version=records_version((r["_rel"], r["label"], r["split"], r["sha256"]) for r in rows),
        computed=computed,
        cached=len(facts) - computed,
        workers=used,
        seconds=round(seconds, 3),
        notes=listing.notes + notes,
    )
    _report(result, config, listing, seed, limits).write(report_path)
    return result


def _report(
    result: IngestResult, config: IngestConfig, listing: Listing, seed: int, limits: ImageLimits
) -> IngestReport:
    return IngestReport(
        source=redact(config.source),
        source_kind=listing.kind,
        layout=listing.layout,
        raw_dir=result.raw_dir.as_posix(),
        manifest=result.manifest_path.as_posix(),
        data_version=result.data_version,
        files=result.files,
        images=result.images,
        unreadable=result.unreadable,
        bytes=result.bytes,
        counts=result.counts,
        class_folders=dict(sorted(listing.class_folders.items())),
        ignored=listing.ignored[:200],
        ignored_count=len(listing.ignored),
        refused=listing.refused[:MAX_REFUSALS_LISTED],
        refused_count=len(listing.refused),
        notes=result.notes,
        seed=seed,
        split_fractions=config.split.model_dump(),
        max_pixels=limits.max_pixels,
        seconds=result.seconds,
        workers=result.workers,
        cache={"computed": result.computed, "reused": result.cached},
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (sections project, ingest, validate)")
    parser.add_argument("--raw-dir", default="data/raw", help="where the source's files are copied")
    parser.add_argument("--manifest", default="data/manifest.csv", help="one row per file")
    parser.add_argument("--report", default="reports/ingest.json", help="counts, data version, refusals, timings")
    return parser


@errors.cli_errors("ingest")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        files.ensure_writable(args.raw_dir, args.manifest, args.report)  # before copying, not after
        result = run_ingest(
            params.ingest,
            params.project.seed,
            args.raw_dir,
            args.manifest,
            args.report,
            max_pixels=params.validate.max_pixels,
            max_image_bytes=params.validate.max_image_bytes,
            allowed_formats=params.validate.allowed_formats,
        )
    except (ParamsError, IngestError) as exc:
        print(f"ingest: {errors.printable(str(exc), keep=chr(10))}", file=sys.stderr)  # names were escaped
        return 2
    per_split = ", ".join(f"{s} {sum(c.values())}" for s, c in result.counts.items())
    print(
        f"ingest: {result.files} files ({result.images} images, {result.unreadable} unreadable; {per_split}) "
        f"-> {result.manifest_path}; data version {result.data_version[:12]}; "
        f"{result.computed} inspected, {result.cached} from cache, {result.seconds:.1f}s"
    )
    if result.refused:
        print(
            f"ingest: refused {result.refused} entr{'y' if result.refused == 1 else 'ies'} the source offered "
            f"(not read; listed in {result.report_path})",
            file=sys.stderr,
        )
    for note in result.notes:
        print(f"ingest: note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
