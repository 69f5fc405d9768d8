"""Perceptual fingerprints of images for the near-duplicate check, cached by content hash.

Method (measured in benchmarks/data_quality.py on flower_photos): two 64-bit perceptual hashes of a
grayscale thumbnail, `imagehash.phash` (low DCT frequencies) and `imagehash.dhash` (horizontal
gradients); two images are near-duplicates when BOTH Hamming distances are at most
`validate.near_duplicates.max_distance` (default 10). On copies of flower photos it found 100% of
those resized to 50% or 25% and re-encoded at JPEG quality 30, about a third of 10% crops and no
heavier crop, with no false pair; over all 6.7M pairs of flower_photos it paired one image across
labels, a true duplicate. phash alone at 10 paired 10 across labels (flowers centred on a dark
background look alike to it); requiring dhash to agree removes those. Backbone-embedding cosine
similarity catches some crops and rotations but misses downscaled copies: validate runs it beside these
hashes (components/quality/embedding_search.py). Hashes are computed once per image and cached by the
manifest's sha256 column.

Mirror images: each image is also hashed as its horizontally mirrored thumbnail (same decode), and a
pair counts when the direct hashes, or one image's mirror hashes against the other's direct hashes, are
within the distance. A mirrored copy is an exact leak for a model trained with horizontal flips; the
direct hashes alone grouped none (issue 24: 0 of 2 planted). Still missed by design: most crops of
10% or more, rotations, vertical flips, heavy recolouring (the hashes see a small grayscale thumbnail).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.core import files
from components.core.progress import progress
from components.ingestion.images import DECODE_VERSION, ImageLimits, UnusableImage, decode_rgb

HASH_BITS = 256  # phash, dhash (64 each) of the thumbnail, then of its mirror image
HALF = 128  # bits of one view (phash then dhash)
# Bumped when the fingerprint or the decode (EXIF orientation) changes: old cache entries are then ignored
CACHE_VERSION = f"phash8+dhash8+mirror-v2+decode{DECODE_VERSION}"


def perceptual_hash(source: str | Path | bytes, limits: ImageLimits) -> np.ndarray:
    """256 bits (bool): phash, dhash of an image, then phash, dhash of its mirror image; one guarded decode."""
    import imagehash
    from PIL import Image

    # Both hashes squash the image to a small grayscale thumbnail; decoding at 64 px lets JPEG draft mode skip work.
    thumb = Image.fromarray(decode_rgb(source, 64, limits))
    mirror = thumb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    views = [fn(view).hash for view in (thumb, mirror) for fn in (imagehash.phash, imagehash.dhash)]
    return np.concatenate([np.asarray(bits, dtype=bool).ravel() for bits in views])


def fingerprints(
    frame: pd.DataFrame, limits: ImageLimits, cache_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """((rows, 256) bool hashes, (rows,) bool decoded) of the manifest's images, by its path and sha256
    columns. Images that cannot be decoded get no hash (validate's decode check reports them).
    Reuses and extends the cache at `cache_path` (a workspace cache, keyed by content hash).

    Memory: the result and, per image, an index entry (issue 24): cached hashes stay packed (32 bytes each),
    new ones are only in the result (their row is remembered), never one small array per image.
    """
    cache = HashCache.read(cache_path)
    out = np.zeros((len(frame), HASH_BITS), dtype=bool)
    decoded = np.zeros(len(frame), dtype=bool)
    fresh: dict[str, int] = {}  # content hash -> the row of `out` that holds its new hash
    rows = progress(zip(frame["path"], frame["sha256"]), len(frame), "validate: perceptual hashes")
    for i, (path, sha) in enumerate(rows):
        if sha in cache.rows:
            out[i] = cache.bits(sha)
        elif sha in fresh:  # byte-identical rows are hashed once
            out[i] = out[fresh[sha]]
        else:
            try:
                out[i] = perceptual_hash(path, limits)
            except UnusableImage:
                continue  # validate's decode check reports it; it simply joins no group
            fresh[sha] = i
        decoded[i] = True
    if cache_path is not None and fresh:
        cache.write(cache_path, fresh, out)
    return out, decoded


class HashCache:
    """The fingerprint cache on disk (`sha256` U64 keys, `bits` packed rows, `version`), read into one packed
    array and an index by content hash."""

    def __init__(self, rows: dict[str, int] | None = None, packed: np.ndarray | None = None) -> None:
        self.rows = rows or {}
        self.packed = packed if packed is not None else np.zeros((0, HASH_BITS // 8), np.uint8)

    @classmethod
    def read(cls, cache_path: str | Path | None) -> HashCache:
        if cache_path is None or not Path(cache_path).is_file():
            return cls()
        try:
            with np.load(cache_path, allow_pickle=False) as data:
                if str(data["version"]) != CACHE_VERSION:
                    return cls()  # an older fingerprint (e.g. without the mirror view) is recomputed, never misread
                packed, keys = data["bits"], data["sha256"].tolist()
        except (OSError, ValueError, KeyError):
            return cls()  # a damaged cache is recomputed, never trusted
        if packed.ndim != 2 or packed.shape[1] * 8 != HASH_BITS or len(keys) != len(packed):
            return cls()
        return cls({sha: row for row, sha in enumerate(keys)}, packed)

    def bits(self, sha: str) -> np.ndarray:
        return np.unpackbits(self.packed[self.rows[sha]]).astype(bool)

    def write(self, cache_path: str | Path, fresh: dict[str, int], hashes: np.ndarray) -> None:
        """The cached entries and the `fresh` ones (content hash -> its row of `hashes`), sorted by content hash."""
        keys = sorted({*self.rows, *fresh})
        packed = np.empty((len(keys), HASH_BITS // 8), np.uint8)
        for j, sha in enumerate(keys):
            packed[j] = np.packbits(hashes[fresh[sha]]) if sha in fresh else self.packed[self.rows[sha]]
        with files.atomic_file(cache_path, "wb") as fh:
            np.savez(fh, version=np.array(CACHE_VERSION), sha256=np.array(keys, dtype="U64"), bits=packed)
