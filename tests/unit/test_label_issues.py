"""Suspect labels: a planted mislabel ranks first; exclusion takes only the top suspects; reports are written."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from components.core.stage_config import ValidateConfig
from components.ingestion.images import ImageLimits
from components.quality import label_issues as li
from tests.conftest import COLORS, write_image
from tests.evalkit import migrated_store

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
    paths = [
        str(write_image(tmp_path / "img" / f"{i}.jpg", color=COLORS[labels[i]], seed=i)) for i in range(len(labels))
    ]
    issues = li.find_label_issues(features, given, CLASSES, paths, folds=3, max_excluded_fraction=0.05)
    written = li.write_reports(
        issues, tmp_path / "reports", ImageLimits.from_config(ValidateConfig()), gallery_images=4
    )
    table = pd.read_csv(written[0])
    assert list(table.columns) == li.COLUMNS and table["path"].iloc[0] == paths[0]
    assert written[1].read_bytes()[:4] == b"\x89PNG"
    exclusions = pd.read_csv(li.write_exclusions(issues, tmp_path))
    assert exclusions["path"].tolist() == [paths[0]]


def test_a_label_and_file_name_with_mathtext_draw_in_the_gallery(tmp_path: Path):
    """`$^^$` is a matplotlib mathtext error: as the planted suspect's label and file name it draws as text."""
    features, labels = clustered_features(per_class=12)
    given = labels.copy()
    given[0] = 1
    classes = ["alpha", "$^^$", "gamma"]
    paths = [str(write_image(tmp_path / "img" / f"$^^${i}.jpg", color=COLORS[labels[i]], seed=i)) for i in range(36)]
    issues = li.find_label_issues(features, given, classes, paths, folds=3)
    assert issues.table["given_label"].iloc[0] == "$^^$"
    written = li.write_reports(
        issues, tmp_path / "reports", ImageLimits.from_config(ValidateConfig()), gallery_images=4
    )
    assert written[1].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_train_head_excludes_the_top_suspects_with_action_exclude(
    tmp_path: Path, keras_home: Path, monkeypatch: pytest.MonkeyPatch
):
    """A red image labelled beta in the tiny manifest is listed in the model folder and left out of training;
    a red test image labelled beta is flagged in the report (split test) and never excluded."""
    from mlflow import MlflowClient

    from components.train_head import run_train_head
    from tests.modelkit import head_paths, tiny_params, write_manifest, write_policy

    manifest = write_manifest(tmp_path)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    planted = frame.index[(frame["label"] == "alpha") & (frame["split"] == "train")][0]
    planted_test = frame.index[(frame["label"] == "alpha") & (frame["split"] == "test")][-1]
    frame.loc[[planted, planted_test], "label"] = "beta"
    frame.to_csv(manifest, index=False)
    params = tiny_params(train_head={"label_issues": {"action": "exclude", "folds": 3, "max_excluded_fraction": 0.07}})
    from components.modeling import head_training

    sizes: list[tuple[int, bool]] = []  # (rows, training) of each vector pipeline
    vectors = head_training.vector_batches

    def counted(x: Any, y: Any, rows: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append((len(rows), args[-1]))  # args[-1]: training
        return vectors(x, y, rows, *args, **kwargs)

    monkeypatch.setattr(head_training, "vector_batches", counted)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", migrated_store(tmp_path / "mlflow.db"))
    monkeypatch.chdir(tmp_path)
    result = run_train_head(params, head_paths(tmp_path, manifest, write_policy(tmp_path / "policy.json")))
    excluded = pd.read_csv(tmp_path / "models/head" / li.EXCLUSIONS_FILE)
    assert excluded["path"].tolist() == [frame.loc[planted, "path"]]  # 7% of 16 training images: one
    assert excluded["given_label"].tolist() == ["beta"] and excluded["suggested_label"].tolist() == ["alpha"]
    # training vectors: 15 images, each as is and in 1 augmented copy; val: 4 images
    assert sorted(sizes) == [(4, False), ((16 - 1) * 2, True)]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id)
    assert run.data.metrics["label_issues_excluded"] == 1
    report = pd.read_csv(tmp_path / "reports/train_head" / li.REPORT_FILE)
    flagged_test = report[report["split"] == "test"]
    assert frame.loc[planted_test, "path"] in flagged_test["path"].tolist()
    assert not flagged_test["excluded"].any() and set(report.loc[report["excluded"], "split"]) == {"train"}
    info = json.loads((tmp_path / "models/head/run.json").read_text())
    assert info["suspect_label_splits"] == ["train", "val", "test"]


def test_gallery_scores_show_two_significant_digits_not_zero():
    assert li.score_text(1.2e-4) == "0.00012" and li.score_text(0.4567) == "0.46" and li.score_text(0.0) == "0"


def split_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Three clusters of 30 train, 10 val and 10 test images each; one wrong label planted in every split."""
    features, labels = clustered_features(per_class=50, dim=64, seed=seed)
    splits = np.array(["train"] * 30 + ["val"] * 10 + ["test"] * 10, dtype=object)[np.arange(150) % 50]
    given = labels.copy()
    planted = np.array([5, 85, 145])  # train alpha -> gamma, val beta -> alpha, test gamma -> beta
    assert list(splits[planted]) == ["train", "val", "test"]
    given[planted] = [2, 0, 1]
    return features, given, planted, list(splits)


def test_planted_wrong_labels_are_flagged_in_train_val_and_test():
    features, given, planted, splits = split_features()
    paths = [f"img_{i}.jpg" for i in range(len(given))]
    issues = li.find_label_issues(features, given, CLASSES, paths, folds=5, seed=1, splits=splits)
    flagged = dict(zip(issues.table["path"], issues.table["split"]))
    for i in planted:
        assert flagged.get(paths[i]) == splits[i]
    assert issues.checked_splits == ("train", "val", "test")
    assert li.COLUMNS[1] == "split"


def test_test_labels_fit_no_head_and_move_no_train_flag():
    """Relabelling every test image changes no train/val score or flag: test rows are only ever scored."""
    features, given, _, splits = split_features()
    paths = [f"img_{i}.jpg" for i in range(len(given))]
    issues = li.find_label_issues(features, given, CLASSES, paths, folds=5, seed=1, splits=splits)
    shuffled = given.copy()
    test = np.flatnonzero(np.array(splits) == "test")
    shuffled[test] = (shuffled[test] + 1) % len(CLASSES)
    again = li.find_label_issues(features, shuffled, CLASSES, paths, folds=5, seed=1, splits=splits)
    kept = issues.table[issues.table["split"] != "test"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, again.table[again.table["split"] != "test"].reset_index(drop=True))
    assert (again.table["split"] == "test").sum() > (issues.table["split"] == "test").sum()


def test_exclusion_takes_only_training_images():
    features, given, planted, splits = split_features()
    paths = [f"img_{i}.jpg" for i in range(len(given))]
    issues = li.find_label_issues(features, given, CLASSES, paths, folds=5, max_excluded_fraction=0.5, splits=splits)
    assert issues.excluded[planted[0]] and set(np.array(splits)[issues.excluded]) == {"train"}
    assert not issues.excluded[planted[1:]].any()  # the val and test suspects are flagged, never excluded
    assert set(issues.table.loc[issues.table["excluded"], "split"]) == {"train"}


def test_the_gallery_takes_suspects_of_every_split_in_turn():
    table = pd.DataFrame(
        {"path": list("abcdefg"), "split": ["train"] * 5 + ["test", "val"], "score": np.arange(7) / 10}
    )
    assert li.gallery_rows(table, 4)["path"].tolist() == ["a", "g", "f", "b"]


def test_suspects_of_a_split_are_read_from_the_report(tmp_path: Path):
    features, given, planted, splits = split_features()
    paths = [f"img_{i}.jpg" for i in range(len(given))]
    issues = li.find_label_issues(features, given, CLASSES, paths, folds=5, splits=splits)
    report = tmp_path / li.REPORT_FILE
    from components.core import files

    files.write_csv(issues.table, report)
    assert paths[planted[2]] in li.suspects_of(report, "test")
    assert set(li.suspects_of(report, "test")) == set(issues.table.loc[issues.table["split"] == "test", "path"])
    assert li.suspects_of(tmp_path / "absent.csv", "test") is None


# --- memory (issue 24): the folds read the features a chunk at a time --------------------------------


@pytest.mark.parametrize("num_classes", [2, 3])
def test_the_streamed_fold_model_gives_sklearns_probabilities(num_classes: int):
    """Same model as make_pipeline(StandardScaler(), LogisticRegression(C=0.03, tol=1e-3)), read 7 rows at a time."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from components.core.array_rows import StackedRows
    from components.quality import streamed_logistic

    features, labels = clustered_features(per_class=20, dim=12, seed=5)
    keep = labels < num_classes
    features, labels = features[keep].astype(np.float32), labels[keep]
    features[:, 3] = 1.0  # a constant feature: left unscaled by both
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.03, tol=1e-3, max_iter=200))
    expected = reference.fit(features, labels).predict_proba(features)
    source = StackedRows([features[:25], features[25:]])  # two parts, read as one
    rows = np.arange(len(labels))
    model = streamed_logistic.fit(source, rows, labels, C=0.03, tol=1e-3, max_iter=200, chunk=7)
    np.testing.assert_allclose(model.probabilities(source, rows, chunk=7), expected, atol=1e-4)
    assert model.classes.tolist() == list(range(num_classes))


def test_label_issue_folds_need_no_memory_per_feature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """tracemalloc sees numpy's allocations: 8x the images (memory-mapped 1,280-d features of train, val and
    test) may not need much more memory; the old folds concatenated and copied every feature."""
    from components.core import array_rows

    monkeypatch.setattr(array_rows, "CHUNK_ROWS", 32)

    def peak_bytes(per_class: int) -> int:
        features, labels = clustered_features(per_class=per_class, dim=1280, seed=2)
        splits = np.array(["train", "train", "train", "val", "test"], dtype=object)[np.arange(len(labels)) % 5]
        parts = []
        for name in ("train", "val", "test"):  # stored like the feature cache: one memory map per split
            np.save(tmp_path / f"{name}_{per_class}.npy", features[splits == name].astype(np.float32))
            parts.append(np.load(tmp_path / f"{name}_{per_class}.npy", mmap_mode="r"))
        order = np.concatenate([np.flatnonzero(splits == name) for name in ("train", "val", "test")])
        labels, splits, paths = labels[order], list(splits[order]), [f"img_{i}.jpg" for i in order]
        del features
        tracemalloc.start()
        try:
            issues = li.find_label_issues(array_rows.StackedRows(parts), labels, CLASSES, paths, 3, 0, 0.0, splits)
            assert issues.checked_splits == ("train", "val", "test")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak_bytes(8)  # imports (cleanlab, scipy) allocate once
    small, large = peak_bytes(64 // 3), peak_bytes(512 // 3)
    feature_bytes = 510 * 1280 * 4  # 2.6 MB on disk
    assert large < 1.5 * small, (small, large)
    assert large - small < feature_bytes / 4, (small, large)  # the old folds: more than 2x feature_bytes
