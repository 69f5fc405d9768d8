"""The fingerprint cache as numpy arrays (issue 24): sorted content-hash keys and packed rows, no dict per
image. Old caches (U64 keys) still read, rows without a well-formed content hash are hashed but not cached,
byte-identical rows are hashed once, and a cache file is never misread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.core.stage_config import ValidateConfig
from components.ingestion.images import ImageLimits, UnusableImage
from components.quality import perceptual_hashes as ph

LIMITS = ImageLimits.from_config(ValidateConfig())


def fake_hash(path: str) -> np.ndarray:
    """256 bits that depend on the path only (no image is decoded)."""
    if "broken" in path:
        raise UnusableImage(path)
    seed = sum(path.encode())
    return np.random.default_rng(seed).integers(0, 2, ph.HASH_BITS).astype(bool)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths perceptual_hash was called with."""
    calls: list[str] = []

    def record(path: str, limits: ImageLimits) -> np.ndarray:
        calls.append(path)
        return fake_hash(path)

    monkeypatch.setattr(ph, "perceptual_hash", record)
    return calls


def digest(i: int) -> str:
    return f"{i:064x}"


def test_rows_are_hashed_once_per_content_hash_and_only_digests_are_cached(hashed: list[str], tmp_path: Path):
    frame = pd.DataFrame(
        {
            "path": ["a.png", "b.png", "a_copy.png", "odd.png", "odd2.png", "broken.png", "c.png"],
            "sha256": [digest(1), digest(2), digest(1), "not-a-digest", "not-a-digest", digest(5), "X" * 64],
        }
    )
    cache = tmp_path / "hashes.npz"
    hashes, decoded = ph.fingerprints(frame, LIMITS, cache)
    assert hashes.shape == (7, ph.HASH_BYTES) and hashes.dtype == np.uint8
    assert decoded.tolist() == [True, True, True, True, True, False, True]
    assert hashed == ["a.png", "b.png", "odd.png", "odd2.png", "broken.png", "c.png"]  # the copy is not hashed
    for row, path in enumerate(["a.png", "b.png", "a.png", "odd.png", "odd2.png"]):
        np.testing.assert_array_equal(np.unpackbits(hashes[row]).astype(bool), fake_hash(path))
    with np.load(cache) as data:  # sorted content hashes; malformed ones and undecodable images left out
        assert data["sha256"].tolist() == [digest(1).encode(), digest(2).encode()]
    hashed.clear()
    again, decoded_again = ph.fingerprints(frame, LIMITS, cache)
    np.testing.assert_array_equal(again, hashes)
    assert decoded_again.tolist() == decoded.tolist()
    assert hashed == ["odd.png", "odd2.png", "broken.png", "c.png"]  # every well-formed digest came from the cache


def test_a_cache_written_before_issue_24_is_read_and_a_misleading_one_is_not(hashed: list[str], tmp_path: Path):
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "sha256": [digest(1), digest(2)]})
    cache = tmp_path / "hashes.npz"
    planted = np.arange(2 * ph.HASH_BYTES, dtype=np.uint8).reshape(2, ph.HASH_BYTES)
    np.savez(  # U64 keys, here out of order: rows follow their keys
        cache, version=np.array(ph.CACHE_VERSION), sha256=np.array([digest(2), digest(1)], "U64"), bits=planted
    )
    hashes, _ = ph.fingerprints(frame, LIMITS, cache)
    np.testing.assert_array_equal(hashes, planted[::-1])
    assert hashed == []
    # Keys longer than a digest are never cut down to one that matches.
    np.savez(cache, version=np.array(ph.CACHE_VERSION), sha256=np.array([digest(1) + "ff"], "U66"), bits=planted[:1])
    hashes, _ = ph.fingerprints(frame, LIMITS, cache)
    assert hashed == ["a.png", "b.png"]
    np.testing.assert_array_equal(np.unpackbits(hashes[0]).astype(bool), fake_hash("a.png"))
