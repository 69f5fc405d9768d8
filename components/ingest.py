"""Ingest: bring a labelled image source into `data/raw` and describe every file in the manifest.

Sources (params `ingest.source`, kinds in components/ingestion/sources.py): a folder of class sub-folders, a
folder already split into `train/ val/ test/` (missing splits are carved from train), a CSV/Parquet
table of (path or URI, label[, split]), a `.zip`/`.tar.gz`/`.tgz` archive, local or by URL, or a
bucket folder through fsspec (`s3://`, `gs://`). The source is only read, never changed, and only
inside its own root (components/ingestion/confine.py); what a source offers but may not deliver is listed
in the report's `refused`.

Every file is hashed (sha256) and, in an allowed format (`validate.allowed_formats`), fully decoded
through the guarded loader (components/ingestion/images.py) in a process pool; results are cached beside
`raw_dir` by (source, size, mtime, ctime, inode) so a rerun on an unchanged source recomputes
nothing (components/ingestion/file_facts.py, facts_cache.py). What is kept of each file until the manifest
is written is a row of arrays (components/ingestion/facts_table.py), and the manifest is written a row at a
time, so memory grows by bytes, not kilobytes, per file (issue 24). Splits come from a hash of each image's
bytes: adding images never moves an existing one, and byte-identical files always share a split
(components/ingestion/manifest_rows.py); then a class with too few val images borrows its lowest-hash
training images (components/ingestion/val_topup.py: the one case where new images can move old ones,
between train and val only).
Undecodable, hidden, non-image files and images in other formats stay in the manifest with an `error`
so that validate can report them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from components.core import errors, files, runtime
from components.core.config import DEFAULT_PARAMS, Params, ParamsError, load_params
from components.core.contracts import IngestReport, write_manifest
from components.core.credentials import redact
from components.core.paths import IngestPaths
from components.ingestion.confine import IngestError, Listing, check_no_overlap, local_path
from components.ingestion.facts_cache import FactsCache
from components.ingestion.file_facts import inspect_entries
from components.ingestion.images import ImageLimits
from components.ingestion.manifest_rows import assign_splits, manifest_order, manifest_rows, summarise_rows
from components.ingestion.sources import collect_source
from components.ingestion.urls import is_remote
from components.ingestion.val_topup import top_up_val

CACHE_DIRNAME = ".ingest_cache"
MAX_REFUSALS_LISTED = 1000  # in the report; refused_count has them all

__all__ = ["IngestError", "IngestResult", "run_ingest", "main"]


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
    moved_to_val: dict[str, int]  # label -> training images moved to val (ingest.min_val_per_class)


def resolve_workers(workers: int) -> int:
    return workers or runtime.available_cores()


def run_ingest(params: Params, paths: IngestPaths) -> IngestResult:
    """Copy the source into raw_dir, inspect every file, write the manifest and the report.

    Every decode keeps to validate's image limits (`max_pixels`, `max_image_bytes`, `allowed_formats`):
    one guard for every decode. Files in other formats are not decoded: their `error` names the format.
    """
    started = time.perf_counter()
    config, limits = params.ingest, ImageLimits.from_config(params.validate)
    if not is_remote(config.source):
        check_no_overlap(local_path(config.source), paths.raw_dir)  # before anything is written next to raw_dir
    cache_dir = paths.raw_dir.parent / CACHE_DIRNAME  # beside, not inside, the DVC-tracked raw_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    workers = resolve_workers(config.workers)
    with FileLock(cache_dir / "lock"), FactsCache(cache_dir, limits) as cache:
        for leftover in cache_dir.glob("staging-*"):  # a killed run's: we hold the lock, so none is in use
            shutil.rmtree(leftover, ignore_errors=True)
        with (
            files.atomic_dir(paths.raw_dir) as new_raw,
            tempfile.TemporaryDirectory(dir=cache_dir, prefix="staging-") as staging,
        ):
            listing = collect_source(config, new_raw, Path(staging), cache_dir / "downloads", paths.raw_dir)
            if not listing.entries:
                raise _nothing_usable(config.source, listing)
            manifest_order(listing.entries, paths.raw_dir)  # every column below is in the manifest's order
            facts, computed, used = inspect_entries(listing.entries, new_raw, cache, workers, limits)
            columns, notes = assign_splits(listing.entries, facts, params.project.seed, config.split)
            moved, val_notes = top_up_val(
                columns, params.project.seed, config.min_val_per_class, config.max_val_share_per_class
            )
        write_manifest(manifest_rows(listing.entries, facts, columns, paths.raw_dir), paths.manifest)
        cache.save(listing.entries, facts)
    summary = summarise_rows(listing.entries, facts, columns)
    result = IngestResult(
        raw_dir=paths.raw_dir,
        manifest_path=paths.manifest,
        report_path=paths.report,
        refused=len(listing.refused),
        computed=computed,
        cached=sum(not e.missing for e in listing.entries) - computed,
        workers=used,
        seconds=round(time.perf_counter() - started, 3),
        notes=listing.notes + notes + val_notes,
        moved_to_val=moved,
        **summary,
    )
    _report(result, summary, params, listing).write(paths.report)
    return result


def _nothing_usable(source: str, listing: Listing) -> IngestError:
    return IngestError(
        f"source {redact(source)!r}: no usable files in class folders (expected "
        f"<class>/<image> or <split>/<class>/<image>); {len(listing.refused)} refused"
        + "".join(f"\n  - {errors.printable(r['name'])}: {errors.printable(r['reason'])}" for r in listing.refused[:10])
    )


def _report(result: IngestResult, summary: dict[str, Any], params: Params, listing: Listing) -> IngestReport:
    return IngestReport(
        source=redact(params.ingest.source),
        source_kind=listing.kind,
        layout=listing.layout,
        raw_dir=result.raw_dir.as_posix(),
        manifest=result.manifest_path.as_posix(),
        class_folders=dict(sorted(listing.class_folders.items())),
        ignored=listing.ignored[:200],
        ignored_count=len(listing.ignored),
        refused=listing.refused[:MAX_REFUSALS_LISTED],
        refused_count=len(listing.refused),
        notes=result.notes,
        seed=params.project.seed,
        split_fractions=params.ingest.split.model_dump(),
        moved_to_val=result.moved_to_val,
        max_pixels=params.validate.max_pixels,
        seconds=result.seconds,
        workers=result.workers,
        cache={"computed": result.computed, "reused": result.cached},
        **summary,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="settings file (sections project, ingest, validate)")
    IngestPaths.add_arguments(parser)
    return parser


@errors.cli_errors("ingest")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = IngestPaths.from_args(args)
    try:
        params = load_params(args.params)
        files.ensure_writable(paths.raw_dir, paths.manifest, paths.report)  # before copying, not after
        result = run_ingest(params, paths)
    except (ParamsError, IngestError) as exc:
        print(f"ingest: {errors.printable(str(exc), keep=chr(10))}", file=sys.stderr)  # names were escaped
        return 2
    _print_summary(result)
    return 0


def _print_summary(result: IngestResult) -> None:
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


if __name__ == "__main__":
    runtime.exit_process(main())
