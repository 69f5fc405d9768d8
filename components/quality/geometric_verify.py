"""Geometric verification of near-duplicate candidates: local features that fit one similarity transform.

A 10% crop or a 5-degree rotation of a photo sits at embedding cosine 0.88-0.96 from it, among the
nearest distinct photos (benchmarks/results/near_duplicates_embeddings.md): no cosine threshold alone
separates them. So embedding neighbours from a lower cosine (`validate.near_duplicates.candidate_cosine`,
at most `max_candidates` per image) are candidates, and a candidate pair is a near-duplicate when the
photos' local features say it is one scene: ORB keypoints of both images (grayscale, longest side
VERIFY_SIDE, decoded by the one guarded loader, components/ingestion/images.py), matches that pass
Lowe's ratio test, and at least `min_inliers` of them fitting one similarity transform (RANSAC,
OpenCV's estimateAffinePartial2D) whose zoom is within `max_scale` either way and whose rotation is
within `max_rotation` degrees: what a crop, a resize or a small turn produces. On flower_photos planted
crops and rotations keep 40+ inliers, unrelated photos of one flower kind at most 8 (the benchmark).

Cost: one decode and ORB pass per image in a candidate pair (features kept in a bounded LRU cache, pairs
ordered so one image's pairs come together) and one match per pair: candidate pairs only, never all pairs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from math import atan2, degrees, hypot

import numpy as np

from components.core.stage_config import NearDuplicatesConfig
from components.ingestion.images import ImageLimits, UnusableImage, decode_gray

VERIFY_SIDE = 320  # longest side the images are matched at: crops' zoom is measured at one size for every image
ORB_FEATURES = 1000  # keypoints per image (at 320 px ORB finds ~500-1000 on a photo)
RATIO = 0.8  # Lowe's ratio test: best match clearly better than the second best
RANSAC_PIXELS = 3.0  # reprojection error of an inlier, at VERIFY_SIDE
FEATURE_CACHE = 1024  # images whose keypoints are kept (~40 KB each)
RANSAC_SEED = 0  # OpenCV's RANSAC draws from a global generator: seeded per pair, a pair's verdict never varies


@dataclass(frozen=True)
class Match:
    """How two images fit one similarity transform: inlier count, zoom (b relative to a), rotation in degrees."""

    inliers: int
    scale: float = 0.0
    rotation: float = 0.0

    def is_copy(self, config: NearDuplicatesConfig) -> bool:
        """Enough inliers, and a zoom and turn that a crop, resize or small rotation produces."""
        return (
            self.inliers >= config.min_inliers
            and 1 / config.max_scale <= self.scale <= config.max_scale
            and abs(self.rotation) <= config.max_rotation
        )


@dataclass(frozen=True)
class Features:
    points: np.ndarray  # (k, 2) float32 keypoint positions
    descriptors: np.ndarray | None  # (k, 32) uint8 ORB descriptors; None when none were found


def features(path: str, limits: ImageLimits) -> Features:
    """ORB keypoints of the image at `path` (decoded within `limits`); none for an image that is not usable."""
    import cv2

    try:
        gray = decode_gray(path, VERIFY_SIDE, limits)
    except UnusableImage:
        return Features(np.zeros((0, 2), np.float32), None)
    keypoints, descriptors = cv2.ORB_create(nfeatures=ORB_FEATURES).detectAndCompute(gray, None)
    return Features(np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2), descriptors)


def match(a: Features, b: Features) -> Match:
    """Ratio-tested ORB matches of a in b, and the similarity transform most of them fit (RANSAC)."""
    import cv2

    if a.descriptors is None or b.descriptors is None or len(a.descriptors) < 2 or len(b.descriptors) < 2:
        return Match(0)
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a.descriptors, b.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < 3:
        return Match(0)
    source = a.points[[m.queryIdx for m in good]]
    target = b.points[[m.trainIdx for m in good]]
    cv2.setRNGSeed(RANSAC_SEED)
    transform, inliers = cv2.estimateAffinePartial2D(
        source, target, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS
    )
    if transform is None:
        return Match(0)
    cos_part, sin_part = float(transform[0, 0]), float(transform[1, 0])
    return Match(int(inliers.sum()), hypot(cos_part, sin_part), degrees(atan2(sin_part, cos_part)))


def cap_per_image(a: np.ndarray, b: np.ndarray, cosine: np.ndarray, per_image: int) -> np.ndarray:
    """Mask of the pairs among the `per_image` closest (by cosine) of at least one of their two images.

    At most n * per_image pairs are kept, whatever the data: a burst of 50 shots does not make 1,225 checks."""
    keep = np.zeros(len(a), bool)
    taken: dict[int, int] = {}
    for k in np.argsort(-cosine, kind="stable").tolist():
        i, j = int(a[k]), int(b[k])
        if taken.get(i, 0) < per_image or taken.get(j, 0) < per_image:
            keep[k] = True
            taken[i], taken[j] = taken.get(i, 0) + 1, taken.get(j, 0) + 1
    return keep


@dataclass
class Verification:
    """Each candidate pair's Match, in the order given, and the seconds the check took."""

    matches: list[Match]
    seconds: float

    def summary(self, config: NearDuplicatesConfig) -> dict[str, float | int]:
        verified = sum(m.is_copy(config) for m in self.matches)
        return {"candidates": len(self.matches), "verified": verified, "seconds": round(self.seconds, 2)}


def verify_pairs(paths: Sequence[str], a: np.ndarray, b: np.ndarray, limits: ImageLimits) -> Verification:
    """Match every candidate pair (paths[a[k]], paths[b[k]]); each image's features are computed once
    while in the cache (pairs of one image come together when `a` is sorted, as the searches return it)."""
    started = time.perf_counter()
    cached = lru_cache(maxsize=FEATURE_CACHE)(lambda row: features(paths[row], limits))
    matches = [match(cached(int(i)), cached(int(j))) for i, j in zip(a, b)]
    return Verification(matches, time.perf_counter() - started)
