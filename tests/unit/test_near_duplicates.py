"""Near-duplicates: a resized, re-encoded or mirrored copy is grouped, a distinct image is not, the
multi-index search finds exactly the pairs of the all-pairs search, and the policy applies
deterministically (cross-split groups move to the split of the smallest content hash)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core.hashing import file_sha256
from components.core.stage_config import ValidateConfig
from components.ingestion.images import DECODE_VERSION, ImageLimits
from components.quality import hamming_search as hs
from components.quality import near_duplicates as nd
from components.quality import perceptual_hashes as ph
from tests.conftest import FLOWERS, copy_subset

LIMITS = ImageLimits.from_config(ValidateConfig())


def scene(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth random picture (blobs of colour), like a photo at thumbnail scale."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def save(img: Image.Image, path: Path, quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=quality)
    return path


def manifest(rows: list[tuple[Path, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"path": str(p), "label": label, "split": split, "sha256": file_sha256(p)} for p, label, split in rows]
    )


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    original = scene(1)
    return {
        "a": save(original, tmp_path / "a.jpg"),
        "a_copy": save(original.resize((80, 60), Image.Resampling.LANCZOS), tmp_path / "a_copy.jpg", quality=40),
        "b": save(scene(2), tmp_path / "b.jpg"),
        "c": save(scene(3), tmp_path / "c.jpg"),
    }


def groups_of(frame: pd.DataFrame, cache: Path | None = None) -> list[list[int]]:
    hashes, decoded = ph.fingerprints(frame, LIMITS, cache)
    return hs.find_groups(hashes, max_distance=10, valid=decoded)


def test_a_planted_near_duplicate_is_grouped_and_distinct_images_are_not(images):
    frame = manifest([(images[k], "x", "train") for k in ("a", "b", "a_copy", "c")])
    assert file_sha256(images["a"]) != file_sha256(images["a_copy"])  # invisible to the exact-byte check
    assert groups_of(frame) == [[0, 2]]


def test_cross_split_group_moves_to_the_split_of_the_smallest_content_hash(images):
    frame = manifest([(images["a"], "x", "train"), (images["a_copy"], "x", "test"), (images["b"], "x", "val")])
    target = frame.iloc[:2].sort_values("sha256")["split"].iloc[0]  # the group is rows 0 and 1
    kept, report = nd.resolve(frame, groups_of(frame), "move")
    assert kept.loc[[0, 1], "split"].tolist() == [target, target]
    assert kept.loc[2, "split"] == "val"  # the distinct image stays where it was
    assert frame["split"].tolist() == ["train", "test", "val"]  # the input frame is not changed
    assert report.counts["cross_split"] == 1 and report.counts["moved_images"] == 1
    # Row order does not change the outcome.
    flipped = frame.iloc[::-1].reset_index(drop=True)
    kept_flipped, _ = nd.resolve(flipped, groups_of(flipped), "move")
    assert set(kept_flipped.loc[kept_flipped["path"].isin(frame["path"][:2]), "split"]) == {target}


def test_report_and_fail_policies_leave_splits_alone(images):
    frame = manifest([(images["a"], "x", "train"), (images["a_copy"], "x", "test")])
    groups = groups_of(frame)
    kept, report = nd.resolve(frame, groups, "report")
    assert kept["split"].tolist() == ["train", "test"] and not report.problems
    assert report.groups[0]["action"] == "reported"
    kept, report = nd.resolve(frame, groups, "fail")
    assert kept["split"].tolist() == ["train", "test"]
    assert len(report.problems) == 1 and "leak" in report.problems[0]


def test_a_group_under_two_labels_is_quarantined_as_a_label_conflict(images):
    frame = manifest(
        [(images["a"], "cats", "train"), (images["a_copy"], "dogs", "train"), (images["b"], "dogs", "train")]
    )
    kept, report = nd.resolve(frame, groups_of(frame), "move")
    assert kept["path"].tolist() == [str(images["b"])]
    assert sorted(report.quarantine["path"]) == sorted([str(images["a"]), str(images["a_copy"])])
    assert list(report.quarantine.columns) == nd.QUARANTINE_COLUMNS
    assert "label conflict" in report.quarantine["reason"].iloc[0]
    assert report.counts["label_conflicts"] == 1


def test_within_split_group_is_reported_and_kept(images):
    frame = manifest([(images["a"], "x", "val"), (images["a_copy"], "x", "val")])
    kept, report = nd.resolve(frame, groups_of(frame), "move")
    assert len(kept) == 2 and report.counts == {**report.counts, "within_split": 1, "moved_images": 0}


def test_hashes_are_cached_by_content_hash_and_undecodable_files_join_no_group(
    images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    frame = manifest([(images["a"], "x", "train"), (images["a_copy"], "x", "train"), (broken, "x", "train")])
    cache = tmp_path / "cache" / "phash.npz"
    cache.parent.mkdir()
    first, decoded = ph.fingerprints(frame, LIMITS, cache)
    assert decoded.tolist() == [True, True, False]

    def no_decoding(source, limits):
        raise AssertionError(f"{source}: a cached hash was recomputed")

    monkeypatch.setattr(ph, "perceptual_hash", no_decoding)
    again, _ = ph.fingerprints(frame.iloc[:2], LIMITS, cache)
    np.testing.assert_array_equal(again, first[:2])


def test_a_damaged_cache_is_recomputed(images, tmp_path: Path):
    cache = tmp_path / "phash.npz"
    cache.write_bytes(b"garbage")
    frame = manifest([(images["a"], "x", "train")])
    hashes, decoded = ph.fingerprints(frame, LIMITS, cache)
    assert decoded.all() and hashes.any()


def test_the_picture_of_the_top_groups_is_a_png(images, tmp_path: Path):
    frame = manifest([(images["a"], "x", "train"), (images["a_copy"], "x", "test")])
    _, report = nd.resolve(frame, groups_of(frame), "move")
    out = nd.plot_groups(frame, report, tmp_path / "groups.png", LIMITS)
    assert out.read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    with Image.open(out) as picture:  # a pair fills a 2-column grid, not 2 of max_members=6 columns
        width, height = picture.size
    assert width < height * 2.5, (width, height)


def _hashes(*pairs: tuple[int, int]) -> np.ndarray:
    """128-bit fingerprints whose phash and dhash halves differ from an all-zero base by the given bit counts."""
    rows = np.zeros((len(pairs), 128), dtype=bool)
    for row, (phash_bits, dhash_bits) in zip(rows, pairs):
        row[:phash_bits] = True
        row[64 : 64 + dhash_bits] = True
    return rows


def test_both_hashes_must_agree_and_groups_chain():
    # Row 1 is close to row 0 on phash only (the false pairs phash alone made in flower_photos): not grouped.
    assert hs.find_groups(_hashes((0, 0), (3, 20)), max_distance=10) == []
    # Rows 0-1 and 1-2 are within 10 on both hashes, rows 0-2 are not: one group by transitivity.
    assert hs.find_groups(_hashes((0, 0), (6, 6), (12, 12), (40, 40)), max_distance=10) == [[0, 1, 2]]
    assert hs.find_groups(_hashes((0, 0), (6, 6)), max_distance=5) == []


def test_validate_entry_point_applies_the_settings(images, tmp_path: Path):
    from components.core.stage_config import NearDuplicatesConfig

    frame = manifest([(images["a"], "x", "train"), (images["a_copy"], "x", "test"), (images["b"], "x", "val")])
    kept, report = nd.check(frame, NearDuplicatesConfig(), LIMITS, tmp_path / "cache.npz", tmp_path / "groups.png")
    assert report.counts["moved_images"] == 1 and kept["split"].iloc[0] == kept["split"].iloc[1]
    assert (tmp_path / "cache.npz").is_file() and (tmp_path / "groups.png").is_file()
    kept, report = nd.check(frame, NearDuplicatesConfig(policy="off"), LIMITS, None)
    assert kept.equals(frame) and report.counts["groups"] == 0
    kept, report = nd.check(frame, NearDuplicatesConfig(max_distance=0), LIMITS, None)
    assert report.counts["groups"] == 0  # the copy differs in a few bits: distance 0 only joins identical hashes


def test_a_cache_of_an_older_fingerprint_version_is_recomputed(images, tmp_path: Path):
    frame = manifest([(images["a"], "x", "train")])
    cache = tmp_path / "phash.npz"
    np.savez(  # the v1 layout: 128 bits (no mirror view) under the old version tag, here all ones
        cache,
        version=np.array("phash8+dhash8-v1"),
        sha256=np.array([frame["sha256"].iloc[0]], dtype="U64"),
        bits=np.packbits(np.ones((1, 128), dtype=bool), axis=1),
    )
    hashes, decoded = ph.fingerprints(frame, LIMITS, cache)
    fresh = ph.perceptual_hash(images["a"], LIMITS)
    assert decoded.all() and hashes.shape == (1, ph.HASH_BYTES)
    np.testing.assert_array_equal(np.unpackbits(hashes[0]).astype(bool), fresh)
    with np.load(cache) as data:  # rewritten in the current version
        assert str(data["version"]) == ph.CACHE_VERSION
    assert "mirror" in ph.CACHE_VERSION and f"decode{DECODE_VERSION}" in ph.CACHE_VERSION  # mirrors, EXIF decode
    # The same tag with entries of the wrong width is not misread either.
    np.savez(
        cache,
        version=np.array(ph.CACHE_VERSION),
        sha256=np.array([frame["sha256"].iloc[0]], dtype="U64"),
        bits=np.packbits(np.ones((1, 128), dtype=bool), axis=1),
    )
    np.testing.assert_array_equal(ph.fingerprints(frame, LIMITS, cache)[0][0], np.packbits(fresh))


def flower_photos(tmp_path: Path, per_class: int) -> list[Path]:
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} not found (set TP_SHARED_DIR)")
    out: list[Path] = []
    for name in sorted(p.name for p in FLOWERS.iterdir() if p.is_dir()):
        out += sorted(copy_subset(FLOWERS / name, tmp_path / "flowers" / name, per_class).iterdir())
    return out


def mirrored(source: Path, dest: Path) -> Path:
    with Image.open(source) as img:
        return save(img.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT), dest)


def test_a_mirrored_copy_of_a_flower_photo_is_grouped_with_its_original(tmp_path: Path):
    original, other = flower_photos(tmp_path, 2)[:2]
    frame = manifest([(original, "daisy", "test"), (mirrored(original, tmp_path / "m.jpg"), "daisy", "train"),
                      (other, "daisy", "train")])  # fmt: skip
    hashes, decoded = ph.fingerprints(frame, LIMITS)
    assert hs.find_groups(hashes, 10, decoded) == [[0, 1]]
    assert hs.find_groups(hashes[:, : ph.HALF // 8], 10, decoded) == []  # the direct hashes alone miss it


def test_the_index_groups_flower_photos_and_planted_copies_exactly_as_all_pairs(tmp_path: Path):
    photos = flower_photos(tmp_path, 60)  # 300 real photos
    copies = []
    for k, source in enumerate(photos[::30]):  # 10 planted copies: resized + re-encoded, or mirrored
        with Image.open(source) as img:
            img = img.convert("RGB")
            copy = (
                img.resize((img.width // 2, img.height // 2))
                if k % 2
                else img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            )
            copies.append(save(copy, tmp_path / "copies" / f"{k}.jpg", quality=50))
    frame = manifest([(p, "x", "train") for p in photos + copies])
    hashes, decoded = ph.fingerprints(frame, LIMITS)
    exact = hs.find_groups(hashes, 10, decoded, search="all_pairs")
    for k in range(len(copies)):  # every copy is grouped with its original
        assert any({30 * k, len(photos) + k} <= set(g) for g in exact), k
    for search in ("auto", "index", 3, 4, 6, 11, 64):
        assert hs.find_groups(hashes, 10, decoded, search=search) == exact, search


def random_words(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(n * 32), dtype=np.uint64).reshape(n, 4).copy()


def flip(word: np.uint64, bits: int, rng: np.random.Generator) -> np.uint64:
    positions = rng.choice(64, bits, replace=False)
    return word ^ np.uint64(sum(1 << int(b) for b in positions))


def planted(rng: np.random.Generator, background: int, distances: range) -> np.ndarray:
    """Random fingerprints plus, per distance k, a direct pair and a mirror pair k bits apart on both hashes."""
    rows = [random_words(rng, background)]
    for k in distances:
        base, direct, mirror = random_words(rng, 3)
        direct[:2] = [flip(base[0], k, rng), flip(base[1], k, rng)]  # base vs direct
        mirror[:2] = [flip(base[2], k, rng), flip(base[3], k, rng)]  # base's mirror vs direct
        rows.append(np.stack([base, direct, mirror]))
    return np.concatenate(rows)


def as_bits(words: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1).astype(bool)


@pytest.mark.parametrize("max_distance", range(0, 33))
def test_the_index_is_exact_at_every_allowed_distance(max_distance: int):
    rng = np.random.default_rng(max_distance)
    words = planted(rng, 60, range(max_distance + 2))
    np.testing.assert_array_equal(hs._words(as_bits(words)), words)
    exact = np.stack(hs.all_pairs(words, max_distance))
    exact = exact[:, np.lexsort(exact[::-1])]
    plans = {3, 4, max_distance // 2 + 1, max_distance + 1} & set(range(hs.MIN_PARTS, 65))
    for parts in sorted(p for p in plans if hs._ball_size(64 // p + 1, max_distance // p) <= 5000):
        np.testing.assert_array_equal(np.stack(hs.index_pairs(words, max_distance, parts)), exact, str(parts))
    found = set(map(tuple, exact.T.tolist()))
    for k in range(max_distance + 1):  # each planted pair within the distance, direct and mirrored, is found
        base = 60 + 3 * k
        assert {(base, base + 1), (base, base + 2)} <= found, k
    # A pair k bits apart on both hashes is grouped exactly when k <= max_distance, directly or mirrored.
    for k in sorted({0, max_distance, max_distance + 1}):
        for mirror in (False, True):
            pair = as_bits(lone_pair(rng, k, k, mirror))
            assert (hs.find_groups(pair, max_distance, search="index") == [[0, 1]]) == (k <= max_distance), (k, mirror)
            assert hs.find_groups(pair, max_distance, search="index") == hs.find_groups(
                pair, max_distance, search="all_pairs"
            )
    # One hash past the distance is enough to keep a pair apart.
    far = min(max_distance + 1, 64)
    for phash_bits, dhash_bits in ((max_distance, far), (far, max_distance)):
        assert hs.find_groups(as_bits(lone_pair(rng, phash_bits, dhash_bits, False)), max_distance) == []


def lone_pair(rng: np.random.Generator, phash_bits: int, dhash_bits: int, mirror: bool) -> np.ndarray:
    """Two fingerprints whose one relation (direct, or row 0's mirror vs row 1) differs by the given bits;
    the other views are complements (64 bits away), so no other relation can pair them."""
    first, second = random_words(rng, 2)
    close = first[2:] if mirror else first[:2]
    second[:2] = [flip(close[0], phash_bits, rng), flip(close[1], dhash_bits, rng)]
    if mirror:
        first[:2] = ~second[:2]  # direct vs direct: 64 bits apart
        second[2:] = second[:2]  # row 0 direct vs row 1 mirror: 64 bits apart
    else:
        first[2:] = ~second[:2]
        second[2:] = ~first[:2]
    return np.stack([first, second])


def test_fingerprints_keep_no_array_per_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Issue 24: new hashes live only in the result (and the cache file), not also as one small array per
    image; the cache reads into one packed array. tracemalloc peak per extra image, hashing and a warm rerun."""
    import tracemalloc

    rng = np.random.default_rng(0)
    monkeypatch.setattr(ph, "perceptual_hash", lambda path, limits: rng.integers(0, 2, ph.HASH_BITS).astype(bool))

    def peak_per_image(count: int) -> tuple[int, int]:
        frame = pd.DataFrame(
            {"path": [f"img_{i}.png" for i in range(count)], "sha256": [f"{i:064x}" for i in range(count)]}
        )
        cache = tmp_path / f"{count}.npz"
        peaks = []
        for _ in ("cold", "warm"):
            tracemalloc.start()
            try:
                hashes, decoded = ph.fingerprints(frame, LIMITS, cache)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        assert decoded.all() and hashes.shape == (count, ph.HASH_BYTES)
        np.testing.assert_array_equal(ph.fingerprints(frame, LIMITS, cache)[0], hashes)  # the cache holds them
        return peaks[0], peaks[1]

    small, large = peak_per_image(200), peak_per_image(2200)
    cold, warm = ((b - a) / 2000 for a, b in zip(small, large))
    # Bytes per image: 1,470 and 710 at first, ~970 and ~480 after the first pass, ~450 and ~270 with packed
    # hashes and an array cache index (issue 24, second pass).
    assert cold < 700 and warm < 400, (cold, warm)
