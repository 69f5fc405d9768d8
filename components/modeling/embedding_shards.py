"""validate's embedding pass split over several workers: shard i of N of a manifest's images, merged by content hash.

An image belongs to shard `int(sha256[:8], 16) % N` of its content hash: every worker agrees without
talking to the others, and adding images never moves one to another shard. A shard's embeddings go into
the cache of components/modeling/embeddings.py (chunk files keyed by sha256 under a model key). A worker
that shares no disk with the orchestrator also exports its shard (`export_shard`: chunk files and a
`shard.json`), and the orchestrator merges that export into its own cache (`merge_shards`).

An export is untrusted: its file names, keys, shapes and dtypes are checked (np.load without pickles),
every key must be an image of that shard of the orchestrator's manifest, and every export is checked
before any is written, so a refused one leaves the cache as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core import files
from components.ingestion.images import ImageLimits, UnusableImage, decode_rgb
from components.modeling.embeddings import CHUNK_ROWS, EmbeddingCache, cached_embeddings

SHARD_FILE = "shard.json"  # an export's description: model key, shard, shards, images
SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK_FILE = re.compile(r"^(?P<name>[0-9a-f]{1,64})(?P<keys>\.keys)?\.npy$")  # EmbeddingCache.write_chunk's names
MAX_SHARDS = 256
MAX_DIMS = 65536  # widest embedding accepted from an export
MAX_SHARD_FILE_BYTES = 4096
PROBE_SIDE = 32  # decode check of images the backbone's input pipeline refused


class ShardRefused(ValueError):
    """An exported shard that does not fit what the orchestrator asked for: nothing of it is merged."""


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4): shard 2 (counted from 0) of 4."""
    match = re.fullmatch(r"(\d{1,4})/(\d{1,4})", text.strip())
    if not match:
        raise ValueError(f"shard {text!r}: expected INDEX/COUNT, e.g. 0/4")
    shard, shards = int(match[1]), int(match[2])
    if not (1 <= shards <= MAX_SHARDS and 0 <= shard < shards):
        raise ValueError(f"shard {text!r}: need 0 <= INDEX < COUNT <= {MAX_SHARDS}")
    return shard, shards


def shard_of(sha256: str, shards: int) -> int:
    """The shard of an image, from its content hash alone."""
    return int(sha256[:8], 16) % shards


def shard_rows(frame: pd.DataFrame, shard: int, shards: int) -> pd.DataFrame:
    """The rows (path, sha256 columns) of `shard`: well-formed hashes only, each content once."""
    valid = frame[frame["sha256"].map(lambda s: isinstance(s, str) and bool(SHA256.match(s)))]
    valid = valid.drop_duplicates("sha256")
    return valid[valid["sha256"].map(lambda s: shard_of(s, shards) == shard).to_numpy(dtype=bool)]


def embed_shard(
    frame: pd.DataFrame,
    shard: int,
    shards: int,
    cache_dir: str | Path,
    key: str,
    make_runner: Callable[[], Any],
    image_size: int,
    limits: ImageLimits,
) -> EmbeddingCache:
    """Cache the embeddings of `shard`'s rows (only those not cached yet are computed).

    A chunk the input pipeline cannot decode is retried without its unusable images: validate never embeds
    those either (they fail its file checks or the perceptual hashing).
    """
    rows = shard_rows(frame, shard, shards)
    try:
        return cached_embeddings(rows, cache_dir, key, make_runner, image_size, limits)
    except Exception:  # tf.data wraps the decoder's error: find the unusable images and retry once
        usable = rows["path"].map(lambda p: _decodes(p, limits)).to_numpy(dtype=bool)
        if usable.all():
            raise
        print(f"embed: shard {shard}/{shards}: {int((~usable).sum())} image(s) do not decode: left out")
        return cached_embeddings(rows[usable], cache_dir, key, make_runner, image_size, limits)


def _decodes(path: str, limits: ImageLimits) -> bool:
    try:
        decode_rgb(path, PROBE_SIDE, limits)
    except (UnusableImage, OSError):
        return False
    return True


def export_shard(cache: EmbeddingCache, shas: list[str], key: str, shard: int, shards: int, out_dir: Path) -> int:
    """Write the cached embeddings of `shas` to `out_dir` as chunk files + shard.json; return how many."""
    out_dir.mkdir(parents=True, exist_ok=True)
    present = [s for s in dict.fromkeys(shas) if s in cache.where]
    export = EmbeddingCache(out_dir)
    start = 0
    for block in cache.rows(present).blocks():
        export.write_chunk(present[start : start + len(block)], block)
        start += len(block)
    files.write_json(out_dir / SHARD_FILE, {"model_key": key, "shard": shard, "shards": shards, "images": len(present)})
    return len(present)


def merge_shards(
    exports: dict[int, Path], shards: int, frame: pd.DataFrame, cache_dir: str | Path, key: str
) -> dict[str, int]:
    """Check every export (shard index -> folder), then add their new embeddings to the cache.

    Raises ShardRefused, naming the shard and what is wrong, before anything is written. Returns counts:
    images received, added (not cached before), and the manifest's images of these shards still missing.
    """
    cache = EmbeddingCache(Path(cache_dir) / key)
    dims = {chunk.shape[1] for chunk in cache.chunks}
    checked = []
    for shard, folder in sorted(exports.items()):
        expected = set(shard_rows(frame, shard, shards)["sha256"])
        chunks = _checked_export(folder, shard, shards, key, expected)
        dims |= {rows.shape[1] for _, rows in chunks}
        if len(dims) > 1:
            raise ShardRefused(f"shard {shard}/{shards}: embedding widths {sorted(dims)} differ from the others")
        checked.append((expected, chunks))
    received = added = missing = 0
    for expected, chunks in checked:
        got: set[str] = set()
        for keys, rows in chunks:
            got.update(keys)
            new = [i for i, s in enumerate(keys) if s not in cache.where]
            if new:
                cache.write_chunk([keys[i] for i in new], np.asarray(rows[new], dtype=np.float32))
            received, added = received + len(keys), added + len(new)
        missing += len(expected - got - set(cache.where))
    return {"received": received, "added": added, "missing": missing}


def _checked_export(
    folder: Path, shard: int, shards: int, key: str, expected: set[str]
) -> list[tuple[list[str], np.ndarray]]:
    """The (keys, rows) chunks of one export, each checked; ShardRefused at the first problem."""
    where = f"shard {shard}/{shards}"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if SHARD_FILE not in names:
        raise ShardRefused(f"{where}: no {SHARD_FILE} in the result")
    strays = [n for n in names if n != SHARD_FILE and not CHUNK_FILE.match(n)]
    links = [n for n in names if (folder / n).is_symlink() or not (folder / n).is_file()]
    if strays or links:
        raise ShardRefused(f"{where}: unexpected entries in the result: {(strays + links)[:5]}")
    _check_description(folder / SHARD_FILE, where, shard, shards, key)
    chunks, seen = [], set()
    for name in names:
        match = CHUNK_FILE.match(name)
        if name == SHARD_FILE or not match or not match["keys"]:
            continue
        rows_name = f"{match['name']}.npy"
        if rows_name not in names:
            raise ShardRefused(f"{where}: {name} has no {rows_name}")
        keys, rows = _load_chunk(folder / name, folder / rows_name, where)
        outside = [s for s in keys if s not in expected]
        if outside:
            raise ShardRefused(f"{where}: {len(outside)} key(s) are not images of this shard, e.g. {outside[0][:16]}")
        if seen & set(keys) or len(set(keys)) != len(keys):
            raise ShardRefused(f"{where}: an image appears twice in the result")
        seen.update(keys)
        chunks.append((keys, rows))
    unpaired = {CHUNK_FILE.match(n)["name"] for n in names if n != SHARD_FILE} - {
        CHUNK_FILE.match(n)["name"] for n in names if n.endswith(".keys.npy")
    }
    if unpaired:
        raise ShardRefused(f"{where}: embeddings without keys: {sorted(unpaired)[:3]}")
    return chunks


def _check_description(path: Path, where: str, shard: int, shards: int, key: str) -> None:
    if path.stat().st_size > MAX_SHARD_FILE_BYTES:
        raise ShardRefused(f"{where}: {SHARD_FILE} is too large")
    try:
        said = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShardRefused(f"{where}: {SHARD_FILE} is not JSON") from None
    wanted = {"model_key": key, "shard": shard, "shards": shards}
    if not isinstance(said, dict) or any(said.get(k) != v for k, v in wanted.items()):
        got = {k: said.get(k) for k in wanted} if isinstance(said, dict) else said
        raise ShardRefused(f"{where}: the result is for {got}, expected {wanted} (another model or Keras version?)")


def _load_chunk(keys_file: Path, rows_file: Path, where: str) -> tuple[list[str], np.ndarray]:
    """One chunk, loaded without pickles: 1-D sha256 keys, float32 (n, d) finite rows."""
    if keys_file.stat().st_size > CHUNK_ROWS * 4 * 64 + 4096:
        raise ShardRefused(f"{where}: {keys_file.name} holds more than {CHUNK_ROWS} keys")
    try:
        keys = np.load(keys_file, allow_pickle=False)
        rows = np.load(rows_file, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise ShardRefused(
            f"{where}: {keys_file.name} or its rows are not a readable .npy ({type(exc).__name__})"
        ) from None
    if keys.dtype.kind != "U" or keys.ndim != 1 or not all(SHA256.match(s) for s in keys.tolist()):
        raise ShardRefused(f"{where}: {keys_file.name} does not hold sha256 keys")
    if rows.dtype != np.float32 or rows.ndim != 2 or len(rows) != len(keys) or not 0 < rows.shape[1] <= MAX_DIMS:
        raise ShardRefused(
            f"{where}: {rows_file.name} is {rows.dtype} {rows.shape}, expected float32 ({len(keys)}, dims)"
        )
    if not np.isfinite(rows).all():
        raise ShardRefused(f"{where}: {rows_file.name} holds NaN or infinite values")
    return keys.tolist(), rows
