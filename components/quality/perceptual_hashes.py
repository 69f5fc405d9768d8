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
HASH_BYTES = HASH_BITS // 8  # packed, as `fingerprints` returns them
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
    """((rows, 32) uint8 packed hashes, (rows,) bool decoded) of the manifest's images, by its path and sha256
    columns (`np.unpackbits` of a row gives `perceptual_hash`'s 256 bits). Images that cannot be decoded get
    no hash (validate's decode check reports them). Reuses and extends the cache at `cache_path` (a workspace
    cache, keyed by content hash); a row whose sha256 is not a 64-digit hex digest is hashed, not cached.

    Memory (issue 24): per image, 32 bytes of hash, a 64-byte key and a few integers; no Python object per
    image, so the cache index and the rows to hash are numpy arrays, never dicts.
    """
    keys = content_keys(frame["sha256"])
    cache = HashCache.read(cache_path)
    out = np.zeros((len(frame), HASH_BYTES), dtype=np.uint8)
    decoded = np.zeros(len(frame), dtype=bool)
    cached = cache.find(keys)
    hit = cached >= 0
    out[hit], decoded[hit] = cache.packed[cached[hit]], True
    first = _first_of_same_key(keys, ~hit)  # byte-identical rows are hashed once
    rows = progress(enumerate(frame["path"]), len(frame), "validate: perceptual hashes")
    for i, path in rows:
        if hit[i]:
            continue
        if first[i] != i and decoded[first[i]]:
            out[i], decoded[i] = out[first[i]], True
            continue
        try:
            out[i] = np.packbits(perceptual_hash(path, limits))
        except UnusableImage:
            continue  # validate's decode check reports it; it simply joins no group
        decoded[i] = True
    new = np.flatnonzero(~hit & decoded & (first == np.arange(len(frame))) & (keys != b""))
    if cache_path is not None and len(new):
        cache.write(cache_path, keys[new], out[new])
    return out, decoded


HEX_DIGEST = r"[0-9a-fA-F]{64}"
KEY_CHUNK = 1 << 16  # rows whose sha256 strings are converted at once
KEY_WIDTH = {"S": 64, "U": 4 * 64}  # bytes of a 64-character key in the cache file (U: before issue 24)


def content_keys(sha256: pd.Series) -> np.ndarray:
    """(rows,) S64: each row's sha256 as ASCII bytes, b"" where it is not a 64-digit hex digest (the column
    comes from a manifest: untrusted). Converted in slices: never a Python string per row at once."""
    out = np.zeros(len(sha256), dtype="S64")
    for start in range(0, len(sha256), KEY_CHUNK):
        part = sha256.iloc[start : start + KEY_CHUNK]
        good = part.str.fullmatch(HEX_DIGEST, na=False).to_numpy(dtype=bool)
        out[start : start + len(part)][good] = np.array(part[good].tolist(), dtype="S64")
    return out


def _first_of_same_key(keys: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Per row, the first row of `among` with the same non-empty key (itself for the others)."""
    first = np.arange(len(keys))
    rows = np.flatnonzero(among & (keys != b""))
    _, where, inverse = np.unique(keys[rows], return_index=True, return_inverse=True)
    first[rows] = rows[where[inverse.ravel()]]
    return first


class HashCache:
    """The fingerprint cache on disk (`sha256` keys, `bits` packed rows, `version`), read into a sorted key
    array and the packed rows in that order: lookups by binary search, no dict (issue 24)."""

    def __init__(self, keys: np.ndarray | None = None, packed: np.ndarray | None = None) -> None:
        self.keys = keys if keys is not None else np.zeros(0, "S64")
        self.packed = packed if packed is not None else np.zeros((0, HASH_BYTES), np.uint8)

    @classmethod
    def read(cls, cache_path: str | Path | None) -> HashCache:
        if cache_path is None or not Path(cache_path).is_file():
            return cls()
        try:
            with np.load(cache_path, allow_pickle=False) as data:
                if str(data["version"]) != CACHE_VERSION:
                    return cls()  # an older fingerprint (e.g. without the mirror view) is recomputed, never misread
                packed, keys = data["bits"], data["sha256"]
                if keys.ndim != 1 or keys.dtype.kind not in "US" or keys.dtype.itemsize > KEY_WIDTH[keys.dtype.kind]:
                    return cls()  # never a longer key cut down to one that looks valid
                keys = keys.astype("S64")  # caches written before issue 24 hold U64 keys
        except (OSError, ValueError, KeyError, UnicodeError):
            return cls()  # a damaged cache is recomputed, never trusted
        if packed.ndim != 2 or packed.shape[1] != HASH_BYTES or len(keys) != len(packed):
            return cls()
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():  # not written by us: sorted, each key once
            keys, unique = np.unique(keys, return_index=True)
            packed = packed[unique]
        return cls(keys, packed)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Per key, its row in `packed`, or -1 (absent, or an empty key)."""
        at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        found = (self.keys[at] == keys) & (keys != b"") if len(self.keys) else np.zeros(len(keys), bool)
        return np.where(found, at, -1)

    def write(self, cache_path: str | Path, keys: np.ndarray, packed: np.ndarray) -> None:
        """The cached entries and new ones (`keys`, none cached yet, each once, with their `packed` rows),
        sorted by content hash."""
        merged = np.concatenate([self.keys, keys])
        order = np.argsort(merged, kind="stable")
        rows = np.concatenate([self.packed, packed])[order]
        with files.atomic_file(cache_path, "wb") as fh:
            np.savez(fh, version=np.array(CACHE_VERSION), sha256=merged[order], bits=rows)
