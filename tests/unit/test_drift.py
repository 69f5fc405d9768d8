"""Drift: a planted shift fires, a same-distribution sample does not; the policy decides the retrain;
the reference is saved with the head model and a run compares only the images the model has not seen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import drift_check
from components.core.contracts import ContractError
from components.core.evaluate_config import DriftConfig
from components.modeling import drift

CLASSES = ["alpha", "beta", "gamma"]
DIM = 24


def embeddings(per_class: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes around fixed centres (the same for every seed), optionally all moved by `shift`."""
    centres = np.random.default_rng(0).normal(0, 1, (len(CLASSES), DIM))  # classes overlap, as in real embeddings
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    x = centres[labels] + rng.normal(0, 1, (len(labels), DIM))
    x[:, : DIM // 2] += shift
    return x.astype(np.float32), labels


def reference(per_class: int = 60) -> drift.Reference:
    x, y = embeddings(per_class, seed=1)
    return drift.build_reference(
        x,
        y,
        CLASSES,
        [f"{i:064x}" for i in range(len(y))],
        confidence=0.9,
        per_class=40,
        seed=0,
        meta={"data_version": "v1"},
    )


def compare(
    x: np.ndarray, y: np.ndarray, policy: str = "on_drift", probs: np.ndarray | None = None
) -> drift.DriftReport:
    return drift.compare(reference(), x, [CLASSES[i] for i in y], probs, DriftConfig(policy=policy, permutations=200))


def test_a_same_distribution_sample_stays_quiet():
    report = compare(*embeddings(30, seed=2))
    assert not report.drifted and not report.retrain
    assert report.overall["p_value"] > report.corrected_significance
    assert all(not r["drift"] for r in report.per_class.values())


def test_a_planted_shift_fires_overall_and_per_class():
    report = compare(*embeddings(30, seed=2, shift=1.0))
    assert report.drifted and report.retrain and "drift" in report.reason
    assert report.overall["drift"] and report.overall["p_value"] <= report.corrected_significance
    assert all(r["drift"] for r in report.per_class.values())


def test_a_shift_in_one_class_is_attributed_to_that_class():
    x, y = embeddings(30, seed=2)
    x[y == 1, :] += 1.5
    report = compare(x, y)
    assert report.per_class["beta"]["drift"]
    assert not report.per_class["alpha"]["drift"] and not report.per_class["gamma"]["drift"]


def test_new_classes_are_reported_and_decide_under_on_drift():
    x, y = embeddings(30, seed=2)
    labels = [CLASSES[i] for i in y[:-10]] + ["delta"] * 10
    report = drift.compare(reference(), x, labels, None, DriftConfig(policy="on_drift"))
    assert report.new_classes == ["delta"] and report.retrain


def test_a_confidence_drop_counts_as_drift():
    x, y = embeddings(30, seed=2)
    unsure = np.full((len(y), 3), 1 / 3)
    report = compare(x, y, probs=unsure)
    assert report.confidence["drop"] == pytest.approx(0.9 - 1 / 3, abs=1e-3) and report.drifted


@pytest.mark.parametrize(
    ("policy", "drifted", "expected"),
    [
        ("always", False, True),
        ("always", True, True),
        ("on_drift", False, False),
        ("on_drift", True, True),
        ("alert", True, False),
        ("alert", False, False),
    ],
)
def test_policy_decides_the_retrain(policy, drifted, expected):
    assert drift.decide(policy, 10, drifted, [])[0] is expected
    assert drift.decide(policy, 0, drifted, [])[0] is False  # nothing new: nothing to retrain on


def test_reference_round_trips_without_pickle(tmp_path: Path):
    ref = reference()
    loaded = drift.Reference.load(ref.save(tmp_path / drift.REFERENCE_FILE))
    np.testing.assert_array_equal(loaded.features, ref.features)
    assert loaded.classes == CLASSES and loaded.meta == {"data_version": "v1"} and loaded.confidence == 0.9
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(ContractError, match="not a drift reference"):
        drift.Reference.load(tmp_path / "bad.npz")


# --- through train_head and a model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, keras_home: Path):
    from tests.modelkit import tiny_params, train_tiny_head

    params = tiny_params(
        train_head={"label_issues": {"folds": 3}}, drift={"reference_per_class": 8, "sample_per_class": 20}
    )
    return {**train_tiny_head(tmp_path_factory.mktemp("drift"), params), "params": params}


@pytest.mark.slow
def test_train_head_saves_the_reference_and_the_label_reports(trained):
    from mlflow import MlflowClient

    root, result = trained["root"], trained["result"]
    ref = drift.Reference.load(root / "models/head" / drift.REFERENCE_FILE)
    assert ref.classes == ["alpha", "beta"] and ref.features.shape[0] == 16 and ref.known.size == 16
    assert ref.meta["run_id"] == result.run_id and 0 < ref.confidence <= 1
    table = pd.read_csv(root / "reports/train_head/label_issues.csv")
    assert {"path", "given_label", "suggested_label", "score"} <= set(table.columns)
    assert (root / "reports/train_head/label_issues.png").read_bytes()[:4] == b"\x89PNG"
    assert pd.read_csv(root / "models/head/label_exclusions.csv").empty  # action report excludes nothing
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{root}/mlflow.db").list_artifacts(result.run_id)}
    assert "label_issues.csv" in artifacts


@pytest.mark.slow
def test_a_run_compares_only_images_the_model_has_not_seen(trained, tmp_path: Path):
    from tests.conftest import write_image

    root, params = trained["root"], trained["params"]
    frame = pd.read_csv(trained["manifest"], dtype=str, keep_default_na=False)
    out = drift_check.run_drift(params, trained["manifest"], root / "models/head", tmp_path / "same.json")
    assert out.new_images == 8 and out.sampled_images == 8  # the val and test rows; training rows are known
    rows = []
    for i in range(20):  # new grey pictures, unlike the red/green training colours
        path = write_image(tmp_path / "new" / f"g{i}.jpg", size=(70, 60), color=(128, 128, 128), seed=500 + i)
        rows.append(
            {**frame.iloc[0].to_dict(), "path": str(path), "label": "alpha", "split": "test", "sha256": f"f{i:063d}"}
        )
    manifest = tmp_path / "new.csv"
    pd.concat([frame, pd.DataFrame(rows)]).to_csv(manifest, index=False)
    report = drift_check.run_drift(params, manifest, root / "models/head", tmp_path / "drift.json")
    assert report.new_images == 28 and drift.DriftReport.read(tmp_path / "drift.json") == report
    assert report.per_class["alpha"]["n_new"] == 20 and report.per_class["alpha"]["drift"]


@pytest.mark.slow
def test_a_reference_from_images_equals_the_one_from_cached_features(trained):
    """What finetune (no feature cache) would save matches what train_head saved from its cache."""
    from components.core.contracts import read_manifest
    from components.modeling.model_folder import load_model_dir

    root, params = trained["root"], trained["params"]
    saved = drift.Reference.load(root / "models/head" / drift.REFERENCE_FILE)
    folder = load_model_dir(root / "models/head")
    rebuilt = drift.reference_from_model(folder.model, read_manifest(trained["manifest"]), folder.classes, params)
    np.testing.assert_array_equal(rebuilt.labels, saved.labels)
    np.testing.assert_allclose(rebuilt.features, saved.features, atol=1e-4)
    np.testing.assert_array_equal(rebuilt.known, saved.known)
    assert rebuilt.confidence == pytest.approx(saved.confidence, abs=1e-4)


def test_the_overall_test_is_capped_in_size(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(drift, "MAX_SIDE", 50)
    x, y = embeddings(30, seed=2)
    report = compare(x, y)
    assert report.overall["n_reference"] == 50 and report.overall["n_new"] == 50
    assert report.per_class["alpha"]["n_new"] == 30  # per-class tests are bounded by the per-class samples


def test_the_cli_reads_the_validated_manifest_and_writes_the_drift_report_named_in_the_paths_table():
    from components.core import paths

    args = drift_check.build_parser().parse_args(["--model-dir", "models/finetune"])
    assert (args.manifest, args.out) == (paths.VALIDATED_MANIFEST, paths.DRIFT_REPORT)
    args = drift_check.build_parser().parse_args(["--model-dir", "m", "--manifest", "today.csv", "--out", "d.json"])
    assert (args.manifest, args.out) == (Path("today.csv"), Path("d.json"))
