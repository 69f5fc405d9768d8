"""Distinct images for the scale benchmark: a photo set's originals, then crops of each photo.

Views of one photo, in the order they are taken: the original (its bytes copied), the 4 quadrants, then
the 9 cells of a 3x3 grid, each crop re-encoded as JPEG. Quadrants do not overlap each other, nor grid
cells each other; a grid cell overlaps the quadrants in part, so the grid comes last. No mirrors: the
near-duplicate check (components/quality/near_duplicates.py) finds those by design.

A set of N images is the first N views of one fixed order: all originals, then the quadrants photo by
photo, then the grid cells photo by photo, photos ordered by a hash of their path (so a partly used level
spreads over the classes instead of filling the first class), so each size holds every smaller one.
Images are written under class folders of a new folder, never into the source.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

SUFFIXES = {".jpg", ".jpeg", ".png"}
GRIDS = (1, 2, 3)  # level 0: the original, 1: quadrants (2x2), 2: cells of a 3x3 grid
JPEG_QUALITY = 90


@dataclass(frozen=True)
class View:
    photo: Path  # the source photo
    label: str  # its class folder
    grid: int  # 1 = the original, else the photo cut into grid x grid cells
    cell: int  # which cell, row-major


def list_photos(source: Path) -> list[tuple[Path, str]]:
    """(photo, class) of every image in the class folders of `source`, ordered by a hash of the relative path."""
    photos = [
        (path, folder.name)
        for folder in sorted(p for p in source.iterdir() if p.is_dir())
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix.lower() in SUFFIXES
    ]
    return sorted(photos, key=lambda item: hashlib.sha256(f"{item[1]}/{item[0].name}".encode()).hexdigest())


def first_per_class(photos: list[tuple[Path, str]], per_class: int) -> list[tuple[Path, str]]:
    seen: Counter[str] = Counter()
    kept = []
    for photo, label in photos:
        if seen[label] < per_class:
            seen[label] += 1
            kept.append((photo, label))
    return kept


def views(photos: list[tuple[Path, str]]) -> Iterator[View]:
    for grid in GRIDS:
        for photo, label in photos:
            for cell in range(grid * grid):
                yield View(photo, label, grid, cell)


def available(photos: list[tuple[Path, str]]) -> int:
    return len(photos) * sum(g * g for g in GRIDS)


def crop_box(width: int, height: int, grid: int, cell: int) -> tuple[int, int, int, int]:
    row, col = divmod(cell, grid)
    return (width * col // grid, height * row // grid, width * (col + 1) // grid, height * (row + 1) // grid)


def view_name(view: View) -> str:
    stem = view.photo.stem
    return view.photo.name if view.grid == 1 else f"{stem}_g{view.grid}c{view.cell}.jpg"


def write_view(view: View, image: Image.Image | None, out_dir: Path) -> Path:
    target = out_dir / view.label / view_name(view)
    if view.grid == 1:
        shutil.copyfile(view.photo, target)  # a copy, never a link: ingest refuses hard links by default
        return target
    assert image is not None
    buffer = io.BytesIO()
    image.crop(crop_box(*image.size, view.grid, view.cell)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    target.write_bytes(buffer.getvalue())
    return target


def make_image_set(source: str | Path, out_dir: str | Path, count: int, photos_per_class: int | None = None) -> int:
    """Write the first `count` views of `source`'s photos under `out_dir`/<class>/; returns how many were written.

    `photos_per_class` (the dry run) uses only that many photos of each class, so small sets hold crops too.
    """
    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    if out_dir == source or out_dir.is_relative_to(source) or source.is_relative_to(out_dir):
        raise ValueError(f"the image set must be written outside the source: {out_dir}")
    photos = list_photos(source)
    if photos_per_class is not None:
        photos = first_per_class(photos, photos_per_class)
    if count > available(photos):
        raise ValueError(f"{count} images asked, {available(photos)} views of {len(photos)} photos available")
    out_dir.mkdir(parents=True, exist_ok=True)
    for label in {label for _, label in photos}:
        (out_dir / label).mkdir(exist_ok=True)
    opened: tuple[Path, Image.Image] | None = None
    for written, view in enumerate(views(photos)):
        if written == count:
            break
        if view.grid != 1 and (opened is None or opened[0] != view.photo):
            with Image.open(view.photo) as image:
                opened = (view.photo, image.convert("RGB"))
        write_view(view, opened[1] if opened else None, out_dir)
    return count
