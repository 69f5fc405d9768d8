"""Geometric verification of near-duplicate candidates (issue 24): a crop or a small rotation of a real
photo fits one similarity transform, two different photos of one flower kind do not, and the stage pairs a
planted crop across splits from a cosine below min_cosine (the embeddings faked: no model)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from components.core.hashing import file_sha256
from components.core.stage_config import NearDuplicatesConfig, ValidateConfig
from components.ingestion.images import ImageLimits, UnusableImage, decode_gray
from components.quality import embedding_search as es
from components.quality import geometric_verify as gv
from components.quality import near_duplicates
from tests.conftest import FLOWERS

LIMITS = ImageLimits.from_config(ValidateConfig())
CONFIG = NearDuplicatesConfig()
PHOTO = "daisy/10172636503_21bededa75_n.jpg"
# Two different dandelions at embedding cosine 0.927 (benchmarks/results/near_duplicates_embeddings.md): the
# closest unrelated pair of flower_photos.
UNRELATED = ("dandelion/138166590_47c6cb9dd0.jpg", "dandelion/3512879565_88dd8fc269_n.jpg")


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The photo, its 10% corner crop and its 5-degree rotation, saved as JPEG."""
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} not found")
    folder = tmp_path_factory.mktemp("copies")
    with Image.open(FLOWERS / PHOTO) as opened:
        photo = opened.convert("RGB")
    w, h = photo.size
    photo.crop((0, 0, w - w // 10, h - h // 10)).save(folder / "corner.jpg", quality=90)
    photo.rotate(5, resample=Image.Resampling.BICUBIC).save(folder / "rotated.jpg", quality=90)
    return {"photo": FLOWERS / PHOTO, "corner": folder / "corner.jpg", "rotated": folder / "rotated.jpg"}


def features(path: Path) -> gv.Features:
    return gv.features(str(path), LIMITS)


def test_a_corner_crop_and_a_small_rotation_fit_one_transform_two_different_photos_do_not(copies):
    photo = features(copies["photo"])
    corner = gv.match(photo, features(copies["corner"]))
    rotated = gv.match(photo, features(copies["rotated"]))
    assert corner.is_copy(CONFIG) and rotated.is_copy(CONFIG)
    assert corner.scale == pytest.approx(1 / 0.9, abs=0.02) and abs(corner.rotation) < 1  # shown 11% larger
    assert abs(rotated.rotation) == pytest.approx(5, abs=0.5) and rotated.scale == pytest.approx(1, abs=0.02)

    unrelated = gv.match(*(features(FLOWERS / p) for p in UNRELATED))
    assert not unrelated.is_copy(CONFIG) and unrelated.inliers < CONFIG.min_inliers
    # The limits on zoom and rotation are part of the verdict: the same inliers at a 45-degree turn are no copy.
    assert not gv.Match(corner.inliers, 1.0, 45.0).is_copy(CONFIG)
    assert not gv.Match(corner.inliers, 2.0, 0.0).is_copy(CONFIG)


def test_an_unusable_image_has_no_features_and_matches_nothing(tmp_path: Path, copies):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)
    empty = features(broken)
    assert empty.descriptors is None and gv.match(empty, features(copies["photo"])) == gv.Match(0)


def test_decode_gray_scales_the_longest_side_up_or_down_and_keeps_the_guards():
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), (200, 30, 30)).save(buffer, "PNG")
    up = decode_gray(buffer.getvalue(), 320, LIMITS)
    down = decode_gray(buffer.getvalue(), 50, LIMITS)
    assert up.shape == (160, 320) and down.shape == (25, 50) and up.dtype == np.uint8
    with pytest.raises(UnusableImage):  # the format allowlist holds here too
        decode_gray(buffer.getvalue(), 320, ImageLimits(LIMITS.max_bytes, LIMITS.max_pixels, ("JPEG",)))


def test_the_candidate_cap_keeps_each_images_closest_pairs_and_bounds_the_total():
    # image 0 has 6 neighbours; 1-6 have only image 0.
    a, b = np.zeros(6, int), np.arange(1, 7)
    cosine = np.array([0.90, 0.95, 0.86, 0.92, 0.88, 0.91], np.float32)
    keep = gv.cap_per_image(a, b, cosine, per_image=2)
    assert keep.all()  # every pair is among its other image's 2 closest
    burst = np.array([(i, j) for i in range(8) for j in range(i + 1, 8)])  # 28 pairs of one 8-shot burst
    keep = gv.cap_per_image(burst[:, 0], burst[:, 1], np.linspace(0.9, 0.86, len(burst)), per_image=2)
    assert keep.sum() <= 8 * 2 and np.bincount(burst[keep].ravel(), minlength=8).min() >= 2


def test_candidate_cosine_above_min_cosine_is_refused_by_name():
    with pytest.raises(ValidationError, match="candidate_cosine"):
        NearDuplicatesConfig(candidate_cosine=0.95, min_cosine=0.93)


def test_the_stage_groups_a_planted_crop_across_splits_by_geometry_and_not_a_photo_at_the_same_cosine(copies):
    paths = [copies["photo"], copies["corner"], FLOWERS / UNRELATED[0]]
    frame = pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "label": ["daisy", "daisy", "daisy"],
            "split": ["train", "test", "val"],
            "sha256": [file_sha256(p) for p in paths],
        }
    )
    # The crop and the other photo both at cosine 0.88 from the photo: candidates, below min_cosine 0.93.
    s = float(np.sqrt(1 - 0.88**2))
    vectors = np.array([[1, 0, 0], [0.88, s, 0], [0.88, 0, s]], np.float32)
    embed = lambda rows: es.ArrayEmbeddings(vectors[rows.index.to_numpy()])  # noqa: E731
    hashes_only, report = near_duplicates.check(frame, CONFIG.model_copy(update={"embeddings": False}), LIMITS, None)
    assert report.groups == []  # the perceptual hashes miss the corner crop

    kept, report = near_duplicates.check(frame, CONFIG, LIMITS, None, embed=embed)
    (group,) = report.groups
    assert sorted(m["path"] for m in group["members"]) == sorted(frame["path"][:2])
    assert group["kind"] == "cross_split" and group["found_by"] == ["geometric"]
    (pair,) = group["pairs"]
    assert pair["cosine"] == pytest.approx(0.88, abs=1e-3) and pair["inliers"] >= CONFIG.min_inliers
    assert kept["split"].tolist()[:2] in (["train", "train"], ["test", "test"]) and kept["split"].iloc[2] == "val"
    assert report.verification["candidates"] == 2 and report.verification["verified"] == 1
    assert report.to_dict()["verification"] == report.verification

    # candidate_cosine = min_cosine: no candidate is verified, the crop is not grouped.
    off = CONFIG.model_copy(update={"candidate_cosine": CONFIG.min_cosine})
    _, report = near_duplicates.check(frame, off, LIMITS, None, embed=embed)
    assert report.groups == [] and report.verification["candidates"] == 0
