"""Suspect labels: a planted mislabel ranks first; exclusion takes only the top suspects; reports are written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import label_issues as li
from components.config import ValidateConfig
from components.images import ImageLimits
from tests.conftest import COLORS, write_image

CLASSES = ["alpha", "beta", "gamma"]


def clustered_features(per_class: int = 30, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated clusters, like backbone features of three easy classes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (len(CLASSES), dim))
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    return centres[labels] + rng.normal(0, 1, (len(labels), dim)), labels


def test_a_planted_mislabel_ranks_first():
    features, labels = clustered_features()
    planted = 17  # an alpha image labelled gamma
    given = labels.copy()
    given[planted] = 2
    paths = [f"img_{i}.jpg" for i in range(len(labels))]
    issues = li.find_label_issues(features, given, CLASSES, paths, folds=5, seed=1)
    top = issues.table.iloc[0]
    assert top["path"] == "img_17" + ".jpg"
    assert (top["given_label"], top["suggested_label"]) == ("gamma", "alpha")
    assert top["score"] < 0.5
    assert not issues.excluded.any()  # max_excluded_fraction 0: report only


def test_clean_labels_flag_nothing_of_note():
    features, labels = clustered_features(seed=3)
    issues = li.find_label_issues(features, labels, CLASSES, [str(i) for i in range(len(labels))], folds=5)
    assert len(issues.table) <= 1


def test_exclusion_takes_the_top_suspects_within_the_budget():
    features, labels = clustered_features(per_class=40)
    given = labels.copy()
    planted = [3, 50, 101]
    given[planted] = [1, 2, 0]
    paths = [f"img_{i}.jpg" for i in range(len(labels))]
    issues = li.find_label_issues(features, given, CLASSES, paths, folds=5, max_excluded_fraction=2 / len(labels))
    assert issues.excluded.sum() == 2
    assert set(np.flatnonzero(issues.excluded)) <= set(planted)
    assert issues.table["excluded"].tolist()[:2] == [True, True]


def test_too_few_images_per_class_ranks_nothing():
    features, labels = clustered_features(per_class=1)
    issues = li.find_label_issues(features, labels, CLASSES, ["a", "b", "c"])
    assert issues.table.empty and issues.folds == 0


def test_reports_and_exclusion_list_are_written(tmp_path: Path):
    features, labels = clustered_features(per_class=12)
    given = labels.copy()
    given[0] = 1
    paths = [str(write_image(tmp_path / "img" / f"{i}.jpg", color=COLORS[labels[i]], seed=i)) for i in range(len(labels))]
    issues = li.find_label_issues(features, given, CLASSES, paths, folds=3, max_excluded_fraction=0.05)
    written = li.write_reports(issues, tmp_path / "reports", ImageLimits.from_config(ValidateConfig()), gallery_images=4)
    table = pd.read_csv(written[0])
    assert list(table.columns) == li.COLUMNS and table["path"].iloc[0] == paths[0]
    assert written[1].read_bytes()[:4] == b"\x89PNG"
    exclusions = pd.read_csv(li.write_exclusions(issues, tmp_path))
    assert exclusions["path"].tolist() == [paths[0]]
