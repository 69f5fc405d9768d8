"""Stage evaluate: reports, MLflow run, registration with aliases, the champion gate, failure modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from components import evaluate
from components.config import EvaluateConfig, Params, parse_params
from components.evaluate import compute_metrics, run_evaluate
from tests.evalkit import CLASSES, free_port, make_model_dir, write_manifest

NAME = "image-classifier"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = a fresh workspace whose MLflow store (sqlite + ./mlruns) lives inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def settings(**promotion: float) -> Params:
    return parse_params({"evaluate": {"batch_size": 8, "worst_examples": 4, "promotion": promotion},
                         "tracking": {"retry_attempts": 2, "retry_backoff_s": 0}})


def evaluate_model(ws: Path, model_dir: Path, params: Params | None = None, manifest: Path | None = None) -> Any:
    manifest = manifest or (ws / "validated.csv" if (ws / "validated.csv").exists() else write_manifest(ws))
    return run_evaluate(params or settings(), manifest, model_dir, None, ws / "reports" / "evaluate", ws / "metrics.json", ws)


def aliases() -> dict[str, str]:
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(NAME).aliases.items()}


def version_tags(version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(NAME, version).tags


def test_first_model_becomes_champion_with_reports_and_lineage(workspace: Path) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "good"))

    assert result.promoted and result.model_version == "1"
    assert aliases() == {"champion": "1", "challenger": "1"}
    tags = version_tags("1")
    assert tags["promotion.decision"] == "champion"
    assert "no champion yet" in tags["promotion.reasons"]
    for key in ("git_commit", "params_sha256", "backbone", "finetune_run_id", "head_run_id", "data_version", "run_id"):
        assert tags[key], key
    assert tags["finetune_run_id"] == "finetune-run" and tags["backbone"] == "tiny_colour"

    reports = workspace / "reports" / "evaluate"
    for name in ("confusion_matrix.png", "reliability.png", "worst_errors.png", "model_card.md", "promotion.json"):
        assert (reports / name).stat().st_size > 0, name
    flat = json.loads((workspace / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) for v in flat.values())  # dvc metrics show wants one level
    assert flat["n_test"] == 12 and {f"recall_{c}" for c in CLASSES} <= set(flat)
    card = (reports / "model_card.md").read_text()
    assert "n = 12 held-out images" in card and "tiny_colour" in card

    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["stage"] == "evaluate"
    assert run.data.metrics["accuracy"] == pytest.approx(result.accuracy)
    logged = {a.path for a in MlflowClient().list_artifacts(result.run_id, "evaluate")}
    assert "evaluate/model_card.md" in logged and "evaluate/confusion_matrix.png" in logged


def test_worse_challenger_stays_challenger_and_says_why(workspace: Path) -> None:
    lenient = settings(min_accuracy=0.0)
    evaluate_model(workspace, make_model_dir(workspace / "good"), lenient)
    worse = evaluate_model(workspace, make_model_dir(workspace / "bad", quality="bad"), lenient)

    assert not worse.promoted
    assert aliases() == {"champion": "1", "challenger": "2"}
    tags = version_tags("2")
    assert tags["promotion.decision"] == "rejected"
    assert float(tags["promotion.champion_accuracy"]) > float(tags["promotion.challenger_accuracy"])
    assert "fail: accuracy" in tags["promotion.reasons"] and "champion v1 re-scored" in tags["promotion.reasons"]
    assert [v.version for v in MlflowClient().search_model_versions(f"name='{NAME}'")]  # rejected versions are kept
    decision = json.loads((workspace / "reports" / "evaluate" / "promotion.json").read_text())
    assert decision["promoted"] is False and decision["champion_version"] == "1"


def test_better_model_takes_champion(workspace: Path) -> None:
    lenient = settings(min_accuracy=0.0)
    evaluate_model(workspace, make_model_dir(workspace / "bad", quality="bad"), lenient)
    better = evaluate_model(workspace, make_model_dir(workspace / "good"), lenient)

    assert better.promoted
    assert aliases() == {"champion": "2", "challenger": "2"}
    assert "pass: accuracy 1.0000 >= champion v1 re-scored" in version_tags("2")["promotion.reasons"]


def test_champion_is_rescored_on_todays_data_not_its_old_metrics(workspace: Path) -> None:
    """The champion scored 1.0 on its own day; on a test split where it is wrong it loses."""
    lenient = settings(min_accuracy=0.0)
    evaluate_model(workspace, make_model_dir(workspace / "good"), lenient)
    # Today's data: the same class names now mean other colours, so the old champion is always wrong.
    today = write_manifest(workspace / "today", classes=["gamma", "alpha", "beta"])
    relearned = make_model_dir(workspace / "relearned", classes=["gamma", "alpha", "beta"])
    result = evaluate_model(workspace, relearned, lenient, today)

    assert result.promoted
    assert float(version_tags("2")["promotion.champion_accuracy"]) < 0.5


def test_threshold_failure_blocks_even_the_first_model(workspace: Path) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "awful", quality="awful"), settings(min_accuracy=0.5))
    assert not result.promoted
    assert aliases() == {"challenger": "1"}
    assert "fail: accuracy 0.0000 < min_accuracy 0.5" in version_tags("1")["promotion.reasons"]


def test_champion_with_another_class_set_is_reported_unscorable(workspace: Path) -> None:
    evaluate_model(workspace, make_model_dir(workspace / "two", classes=["alpha", "beta"]),
                   manifest=write_manifest(workspace / "old", classes=["alpha", "beta"]))
    result = evaluate_model(workspace, make_model_dir(workspace / "three"), manifest=write_manifest(workspace / "new"))

    assert result.promoted
    tags = version_tags("2")
    assert "class set differs" in tags["promotion.champion_problem"]
    assert "could not be re-scored" in tags["promotion.reasons"]


def test_unreachable_server_fails_naming_it_without_password_and_keeps_the_model(
        workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = make_model_dir(workspace / "models" / "finetune")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    manifest = write_manifest(workspace)
    params_file = workspace / "params.yaml"
    params_file.write_text(yaml.safe_dump({"tracking": {"retry_attempts": 2, "retry_backoff_s": 0}}))
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: seconds each
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    code = evaluate.main(["--params", str(params_file), "--manifest", str(manifest), "--model-dir", str(model_dir),
                          "--head-dir", "models/head", "--report-dir", "reports/evaluate", "--metrics", "metrics.json"])

    err = capsys.readouterr().err
    assert code == 1
    assert f"***@127.0.0.1:{port}" in err and "s3cret" not in err
    assert "no retraining needed" in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert not (workspace / "reports" / "evaluate").exists() and not (workspace / "metrics.json").exists()


def test_cli_reports_a_missing_model_instead_of_a_traceback(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workspace / "params.yaml").write_text("{}\n")
    code = evaluate.main(["--params", "params.yaml", "--manifest", str(write_manifest(workspace)),
                          "--model-dir", "models/nothing", "--report-dir", "r", "--metrics", "m.json"])
    assert code == 2
    assert "model.keras not found" in capsys.readouterr().err


def test_top_k_is_reported_only_with_more_than_five_classes() -> None:
    rng = np.random.default_rng(0)
    config = EvaluateConfig(top_k=3)
    for n_classes, expected in ((3, False), (6, True)):
        probs = rng.dirichlet(np.ones(n_classes), size=40)
        labels = rng.integers(0, n_classes, size=40)
        metrics = compute_metrics(labels, probs, [f"c{i}" for i in range(n_classes)], config)
        assert ("top_3_accuracy" in metrics) is expected
        if expected:
            assert metrics["top_3_accuracy"] >= metrics["accuracy"]


def test_overconfident_model_has_large_calibration_error() -> None:
    labels = np.array([0, 1] * 20)
    certain_and_half_wrong = np.tile([[0.99, 0.01]], (40, 1))
    honest = np.array([[0.5, 0.5]] * 40)
    config = EvaluateConfig()
    assert compute_metrics(labels, certain_and_half_wrong, ["a", "b"], config)["ece"] == pytest.approx(0.49, abs=1e-6)
    assert compute_metrics(labels, honest, ["a", "b"], config)["ece"] == pytest.approx(0.0, abs=1e-6)
