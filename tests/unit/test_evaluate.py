"""Stage evaluate: reports, MLflow run, registration with aliases, the champion gate, failure modes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from components import evaluate
from components.core.config import Params, parse_params
from components.core.contracts import PromotionRecord, TestMetrics
from components.core.hashing import manifest_version
from components.core.paths import EvaluatePaths
from components.evaluate import run_evaluate
from components.lifecycle import promotion
from components.scoring import evaluation_reports, scoring
from tests.evalkit import (
    CLASSES,
    ModelDirCopies,
    empty_tracking_store,
    free_port,
    write_manifest,
    write_stage_reports,
)

NAME = "image-classifier"


@pytest.fixture(scope="module")
def make_model_dir(tmp_path_factory: pytest.TempPathFactory) -> ModelDirCopies:
    """evalkit.make_model_dir, each stand-in model built once for the module: every test gets its own copy."""
    return ModelDirCopies(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return empty_tracking_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> Path:
    """cwd = a fresh workspace whose MLflow store (sqlite + ./mlruns) lives inside it, starting empty."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def settings(**promotion: float) -> Params:
    return parse_params(
        {
            "evaluate": {"batch_size": 8, "worst_examples": 4, "promotion": promotion},
            "tracking": {"retry_attempts": 2, "retry_backoff_s": 0},
        }
    )


def evaluate_model(
    ws: Path, model_dir: Path, params: Params | None = None, manifest: Path | None = None, **paths: Path
) -> Any:
    manifest = manifest or (ws / "validated.csv" if (ws / "validated.csv").exists() else write_manifest(ws))
    return run_evaluate(params or settings(), EvaluatePaths(manifest=manifest, model_dir=model_dir, **paths).under(ws))


def aliases() -> dict[str, str]:
    return {alias: str(v) for alias, v in MlflowClient().get_registered_model(NAME).aliases.items()}


def version_tags(version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(NAME, version).tags


def test_first_model_becomes_champion_with_reports_and_lineage(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    write_stage_reports(workspace / "handoff", quarantined=3)  # read from the paths given, not reports/
    (workspace / "dvc.lock").write_text("stages:\n  ingest:\n    outs:\n    - path: data/raw\n      md5: f00d.dir\n")
    model_dir = make_model_dir(workspace / "good")
    result = evaluate_model(
        workspace,
        model_dir,
        ingest_report=Path("handoff/reports/ingest.json"),
        validation_summary=Path("handoff/reports/validation/summary.json"),
    )

    assert result.promoted and result.model_version == "1"
    assert aliases() == {"champion": "1", "challenger": "1"}
    tags = version_tags("1")
    assert tags["promotion.decision"] == "champion"
    assert "no champion yet" in tags["promotion.reasons"]
    for key in ("git_commit", "params_sha256", "backbone", "finetune_run_id", "head_run_id", "data_version", "run_id"):
        assert tags[key], key
    assert tags["finetune_run_id"] == "finetune-run" and tags["backbone"] == "tiny_colour"
    # Data versions come from the hand-off files (ingest report, validation summary, run.json), not dvc.lock.
    assert (tags["data_version"], tags["validated_version"], tags["model_data_version"]) == (
        "ingest-v1",
        "validated-v1",
        "data-v1",
    )
    assert "data_raw_md5" not in tags
    assert tags[scoring.SHA256_TAG] == json.loads((model_dir / "run.json").read_text())["model_sha256"]

    reports = workspace / "reports" / "evaluate"
    for name in ("confusion_matrix.png", "reliability.png", "worst_errors.png", "model_card.md", "promotion.json"):
        assert (reports / name).stat().st_size > 0, name
    flat = json.loads((workspace / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) for v in flat.values())  # dvc metrics show wants one level
    assert flat["n_test"] == 12 and {f"recall_{c}" for c in CLASSES} <= set(flat)
    assert TestMetrics.read_optional(workspace / "metrics.json").accuracy == pytest.approx(result.accuracy)
    record = PromotionRecord.read(reports / "promotion.json")
    assert record.promoted and record.version == "1" and record.challenger.per_class_recall == {c: 1.0 for c in CLASSES}
    card = (reports / "model_card.md").read_text()
    assert "n = 12 held-out images" in card and "tiny_colour" in card
    assert "- files quarantined by validation: 3\n" in card  # validate's counts.quarantined, read via the contract

    # The registry shows the card as the version's description.
    assert MlflowClient().get_model_version(NAME, "1").description == card

    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["stage"] == "evaluate" and run.info.status == "FINISHED"
    assert mlflow.active_run() is None  # the stage's run ended with the stage, not at process exit
    assert run.data.metrics["accuracy"] == pytest.approx(result.accuracy)
    logged = {a.path for a in MlflowClient().list_artifacts(result.run_id, "evaluate")}
    assert "evaluate/model_card.md" in logged and "evaluate/confusion_matrix.png" in logged


def test_worse_challenger_stays_challenger_and_says_why(workspace: Path, make_model_dir: ModelDirCopies) -> None:
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


def test_better_model_takes_champion(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    lenient = settings(min_accuracy=0.0)
    evaluate_model(workspace, make_model_dir(workspace / "bad", quality="bad"), lenient)
    better = evaluate_model(workspace, make_model_dir(workspace / "good"), lenient)

    assert better.promoted
    assert aliases() == {"champion": "2", "challenger": "2"}
    assert "pass: accuracy 1.0000 >= champion v1 re-scored" in version_tags("2")["promotion.reasons"]


def test_champion_is_rescored_on_todays_data_not_its_old_metrics(
    workspace: Path, make_model_dir: ModelDirCopies
) -> None:
    """The champion scored 1.0 on its own day; on a test split where it is wrong it loses."""
    lenient = settings(min_accuracy=0.0)
    evaluate_model(workspace, make_model_dir(workspace / "good"), lenient)
    # Today's data: the same class names now mean other colours, so the old champion is always wrong.
    today = write_manifest(workspace / "today", classes=["gamma", "alpha", "beta"])
    relearned = make_model_dir(workspace / "relearned", classes=["gamma", "alpha", "beta"])
    result = evaluate_model(workspace, relearned, lenient, today)

    assert result.promoted
    assert float(version_tags("2")["promotion.champion_accuracy"]) < 0.5


def test_a_label_with_mathtext_draws_in_the_confusion_matrix_and_worst_errors(
    workspace: Path, make_model_dir: ModelDirCopies
) -> None:
    """`$^^$` is a matplotlib mathtext error; as a class name (and so a folder in every path) it draws as text."""
    classes = ["alpha", "beta", "$^^$"]
    manifest = write_manifest(workspace / "data", classes=classes)
    evaluate_model(workspace, make_model_dir(workspace / "bad", classes, quality="bad"), settings(), manifest)
    reports = workspace / "reports" / "evaluate"
    for name in ("confusion_matrix.png", "worst_errors.png"):
        assert (reports / name).read_bytes()[:4] == b"\x89PNG", name
    assert "| \\$^^\\$ |" in (reports / "model_card.md").read_text()


def test_threshold_failure_blocks_even_the_first_model(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "awful", quality="awful"), settings(min_accuracy=0.5))
    assert not result.promoted
    assert aliases() == {"challenger": "1"}
    assert "fail: accuracy 0.0000 < min_accuracy 0.5" in version_tags("1")["promotion.reasons"]


def test_champion_with_another_class_set_keeps_its_place_unless_allowed(
    workspace: Path, make_model_dir: ModelDirCopies
) -> None:
    evaluate_model(
        workspace,
        make_model_dir(workspace / "two", classes=["alpha", "beta"]),
        manifest=write_manifest(workspace / "old", classes=["alpha", "beta"]),
    )
    new = write_manifest(workspace / "new")
    refused = evaluate_model(workspace, make_model_dir(workspace / "three"), manifest=new)

    assert not refused.promoted
    assert aliases() == {"champion": "1", "challenger": "2"}
    tags = version_tags("2")
    assert "class set differs" in tags["promotion.champion_problem"]
    assert "fail: champion v1 could not be re-scored (class set differs" in tags["promotion.reasons"]

    allowed = evaluate_model(workspace, make_model_dir(workspace / "three"), settings(allow_class_set_change=True), new)
    assert allowed.promoted and aliases() == {"champion": "3", "challenger": "3"}


def test_champion_that_fails_to_load_is_not_replaced(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    """Any re-scoring error fails closed: here the champion's stored model file no longer matches its hash."""
    evaluate_model(workspace, make_model_dir(workspace / "good"))
    stored = [p for p in (workspace / "mlruns").rglob("artifacts/model.keras")]
    assert len(stored) == 1
    stored[0].write_bytes(stored[0].read_bytes() + b"tampered")
    result = evaluate_model(workspace, make_model_dir(workspace / "good2"), settings(promote_on_tie=True))

    assert not result.promoted
    assert aliases() == {"champion": "1", "challenger": "2"}
    tags = version_tags("2")
    assert "could not load or run it" in tags["promotion.champion_problem"]
    assert "sha256" in tags["promotion.champion_problem"]
    assert "fail: champion v1 could not be re-scored" in tags["promotion.reasons"]


def test_equal_model_does_not_promote_on_a_tie_by_default(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    evaluate_model(workspace, make_model_dir(workspace / "good"))
    tie = evaluate_model(workspace, make_model_dir(workspace / "same"))
    assert not tie.promoted and aliases() == {"champion": "1", "challenger": "2"}
    assert "ties champion v1" in version_tags("2")["promotion.reasons"]
    allowed = evaluate_model(workspace, make_model_dir(workspace / "same2"), settings(promote_on_tie=True))
    assert allowed.promoted and aliases()["champion"] == "3"


def test_model_with_nan_outputs_is_never_promoted(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "nan", quality="nan"), settings(min_accuracy=0.0))
    assert not result.promoted
    assert aliases() == {"challenger": "1"}
    assert "12 of 12 test images got non-finite (NaN/inf) probabilities" in version_tags("1")["promotion.reasons"]
    assert json.loads((workspace / "metrics.json").read_text())["non_finite_rows"] == 12


def test_champion_alias_is_not_moved_if_it_changed_during_evaluation(
    workspace: Path, make_model_dir: ModelDirCopies, monkeypatch: pytest.MonkeyPatch
) -> None:
    lenient = settings(min_accuracy=0.0)
    evaluate_model(workspace, make_model_dir(workspace / "bad", quality="bad"), lenient)  # v1 champion
    evaluate_model(workspace, make_model_dir(workspace / "awful", quality="awful"), lenient)  # v2, rejected
    real_rescore = promotion.rescore_champion

    def rescore_then_someone_moves_the_alias(*args: Any, **kwargs: Any) -> Any:
        scored = real_rescore(*args, **kwargs)
        MlflowClient().set_registered_model_alias(NAME, "champion", "2")  # an admin (or another run) meanwhile
        return scored

    monkeypatch.setattr(promotion, "rescore_champion", rescore_then_someone_moves_the_alias)
    result = evaluate_model(workspace, make_model_dir(workspace / "good"), lenient)

    assert not result.promoted
    assert aliases() == {"champion": "2", "challenger": "3"}
    reasons = version_tags("3")["promotion.reasons"]
    assert "pass: accuracy 1.0000 >= champion v1 re-scored" in reasons
    assert "the champion alias moved from v1 to v2 while this version was evaluated" in reasons
    assert not PromotionRecord.read(workspace / "reports" / "evaluate" / "promotion.json").promoted


def test_challenger_alias_moves_only_after_the_reports_are_logged(
    workspace: Path, make_model_dir: ModelDirCopies, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate_model(workspace, make_model_dir(workspace / "good"))

    def upload_fails(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("artifact store refused the upload")

    monkeypatch.setattr(MlflowClient, "log_artifact", upload_fails)
    with pytest.raises(PermissionError):
        evaluate_model(workspace, make_model_dir(workspace / "bad", quality="bad"), settings(min_accuracy=0.0))
    assert aliases() == {"champion": "1", "challenger": "1"}  # v2 is registered, but not announced as challenger


def test_unreachable_server_fails_naming_it_without_password_and_keeps_the_model(
    workspace: Path, make_model_dir: ModelDirCopies, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = make_model_dir(workspace / "models" / "finetune")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    manifest = write_manifest(workspace)
    params_file = workspace / "params.yaml"
    params_file.write_text(yaml.safe_dump({"tracking": {"retry_attempts": 2, "retry_backoff_s": 0}}))
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: seconds each
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    loaded = []  # told before the model loads and the test set is scored (minutes on a big test split)
    monkeypatch.setattr(evaluate, "load_model_dir", lambda *a, **k: loaded.append(a) or pytest.fail("model loaded"))

    code = evaluate.main(
        [
            "--params",
            str(params_file),
            "--manifest",
            str(manifest),
            "--model-dir",
            str(model_dir),
            "--head-dir",
            "models/head",
            "--report-dir",
            "reports/evaluate",
            "--metrics",
            "metrics.json",
        ]
    )

    err = capsys.readouterr().err
    assert code == 1
    assert f"***@127.0.0.1:{port}" in err and "s3cret" not in err
    assert "no retraining needed" in err and loaded == []
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert not (workspace / "reports" / "evaluate").exists() and not (workspace / "metrics.json").exists()


def test_cli_reports_a_missing_model_instead_of_a_traceback(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workspace / "params.yaml").write_text("{}\n")
    code = evaluate.main(
        [
            "--params",
            "params.yaml",
            "--manifest",
            str(write_manifest(workspace)),
            "--model-dir",
            "models/nothing",
            "--report-dir",
            "r",
            "--metrics",
            "m.json",
        ]
    )
    assert code == 2
    assert "not found: run the training stages first" in capsys.readouterr().err


def test_a_dvc_experiment_registers_nothing_unless_its_settings_say_so(
    workspace: Path, make_model_dir: ModelDirCopies, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate_model(workspace, make_model_dir(workspace / "bad", quality="bad"), settings(min_accuracy=0.0))  # v1
    monkeypatch.setenv("DVC_EXP_NAME", "exp-lr")
    quiet = evaluate_model(workspace, make_model_dir(workspace / "good"))
    assert not quiet.promoted and quiet.model_version == ""
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name='{NAME}'")] == ["1"]
    record = PromotionRecord.read(workspace / "reports" / "evaluate" / "promotion.json")
    assert record.version == "" and "register_model is off" in record.reasons[0]
    assert MlflowClient().get_run(quiet.run_id).data.metrics["accuracy"] == 1.0  # the run and its metrics are kept

    params = parse_params(
        {
            "evaluate": {"batch_size": 8, "worst_examples": 4, "experiments": {"register_model": True}},
            "tracking": {"retry_attempts": 2, "retry_backoff_s": 0},
        }
    )
    registered = evaluate_model(workspace, make_model_dir(workspace / "good"), params)
    assert not registered.promoted and aliases() == {"champion": "1", "challenger": "2"}
    assert "evaluate.experiments.promote is off" in version_tags("2")["promotion.reasons"]


def evaluation_run_model(run_id: str) -> Any:
    """The LoggedModel the evaluation run logged (MLflow 3's Models tab)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    models = [
        m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id]) if m.source_run_id == run_id
    ]
    assert len(models) == 1
    return client.get_logged_model(models[0].model_id)


def test_test_metrics_are_linked_to_the_logged_model_and_the_test_split(
    workspace: Path, make_model_dir: ModelDirCopies
) -> None:
    manifest = write_manifest(workspace)
    result = evaluate_model(workspace, make_model_dir(workspace / "good"), manifest=manifest)
    model = evaluation_run_model(result.run_id)
    linked = {m.key: m.value for m in model.metrics or []}
    # Each names the dataset that produced it: the test split, as logged as the run's evaluation input.
    test_split = (manifest.name, manifest_version(manifest)[:36])
    assert {(m.dataset_name, m.dataset_digest) for m in model.metrics} == {test_split}
    inputs = MlflowClient().get_run(result.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [test_split]
    assert linked["accuracy"] == pytest.approx(result.accuracy)
    assert linked["macro_f1"] == pytest.approx(result.macro_f1)
    assert linked["ece"] == pytest.approx(result.ece)
    assert {m.run_id for m in model.metrics} == {result.run_id}
    assert len(model.metrics) == len(linked)  # each metric linked once, not once per logging path
    # The registered version is that model (the SQL registry keeps the link as the version's source).
    assert MlflowClient().get_model_version(NAME, result.model_version).source == f"models:/{model.model_id}"


def test_the_test_split_is_the_runs_evaluation_dataset_input(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    manifest = write_manifest(workspace)
    result = evaluate_model(workspace, make_model_dir(workspace / "good"), manifest=manifest)
    inputs = MlflowClient().get_run(result.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert tags["mlflow.data.context"] == "evaluation"
    assert dataset.digest == manifest_version(manifest)[:36] and dataset.name == manifest.name
    assert json.loads(dataset.profile)["num_rows"] == 12  # the test rows only, not the whole manifest
    assert str(manifest.resolve()) in dataset.source


def test_figures_are_logged_as_images_besides_the_report_files(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "good"))
    figures = {a.path for a in MlflowClient().list_artifacts(result.run_id, "figures")}
    assert figures == {f"figures/{n}" for n in ("confusion_matrix.png", "reliability.png", "worst_errors.png")}
    assert "evaluate/confusion_matrix.png" in {a.path for a in MlflowClient().list_artifacts(result.run_id, "evaluate")}


def test_evaluate_run_nests_under_the_pipeline_parent_run(
    workspace: Path, make_model_dir: ModelDirCopies, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.core.pipeline_runs import WORKSPACE_TAG, workspace_tag

    client = MlflowClient()
    experiment_id = client.create_experiment("image-classification")
    parent = client.create_run(experiment_id, run_name="pipeline").info.run_id
    monkeypatch.setenv("TP_MLFLOW_PARENT_RUN_ID", parent)
    result = evaluate_model(workspace, make_model_dir(workspace / "good"))
    tags = client.get_run(result.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags[WORKSPACE_TAG] == workspace_tag()[WORKSPACE_TAG]


def read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_suspects(workspace: Path, manifest: Path) -> set[str]:
    """train_head's label_issues.csv flagging the gamma test images, one alpha test image and a train image."""
    rows = list(csv.DictReader(manifest.open()))
    test = [r for r in rows if r["split"] == "test"]
    flagged = [r for r in test if r["label"] == "gamma"] + [next(r for r in test if r["label"] == "alpha")]
    train = next(r for r in rows if r["split"] == "train")
    table = [{**r, "given_label": r["label"]} for r in [*flagged, train]]
    path = workspace / "reports" / "train_head" / "label_issues.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "split", "given_label", "suggested_label", "score", "flagged", "excluded"])
        writer.writeheader()
        for r in table:
            writer.writerow(
                {"path": r["path"], "split": r["split"], "given_label": r["label"], "suggested_label": "beta"}
            )
    return {r["path"] for r in flagged}


def test_cli_writes_the_predictions_table_dvc_draws_the_confusion_matrix_from(
    workspace: Path, make_model_dir: ModelDirCopies
) -> None:
    """Also: with train_head's suspect labels (default --suspects path), accuracy without the flagged test images."""
    manifest = write_manifest(workspace)
    suspects = write_suspects(workspace, manifest)
    model_dir = make_model_dir(workspace / "models" / "finetune", quality="bad")
    (workspace / "params.yaml").write_text(
        yaml.safe_dump({"evaluate": {"batch_size": 8, "worst_examples": 4, "promotion": {"min_accuracy": 0.0}}})
    )
    code = evaluate.main(
        [
            "--params",
            "params.yaml",
            "--manifest",
            str(manifest),
            "--model-dir",
            str(model_dir),
            "--report-dir",
            "reports/evaluate",
            "--metrics",
            "metrics.json",
            "--predictions",
            "reports/test_predictions.csv",
        ]
    )
    assert code == 0
    rows = read_predictions(workspace / "reports" / "test_predictions.csv")
    assert list(rows[0]) == ["path", "actual", "predicted", "probability"]
    test_rows = [r for r in csv.DictReader(manifest.open()) if r["split"] == "test"]
    assert [(r["path"], r["actual"]) for r in rows] == [(r["path"], r["label"]) for r in test_rows]
    assert {r["predicted"] for r in rows} <= set(CLASSES)
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    accuracy = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
    metrics = json.loads((workspace / "metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["accuracy"])  # the headline: every test image
    assert not list((workspace / "reports").glob(".test_predictions.csv.tmp-*"))  # written atomically
    kept = [r for r in rows if r["path"] not in suspects]
    assert metrics["n_test_suspects"] == len(suspects) == 5
    assert metrics["accuracy_without_suspects"] == pytest.approx(
        sum(r["actual"] == r["predicted"] for r in kept) / len(kept)
    )
    assert metrics["accuracy_without_suspects"] != pytest.approx(metrics["accuracy"])  # the bad model misses gammas
    left_out = list(csv.DictReader((workspace / "reports" / "evaluate" / evaluation_reports.TEST_SUSPECTS_FILE).open()))
    assert {r["path"] for r in left_out} == suspects  # the flagged train image is not a test suspect
    card = (workspace / "reports" / "evaluate" / "model_card.md").read_text()
    assert "accuracy without the 5 test image(s) flagged as suspect labels" in card


def test_suspect_test_labels_not_checked_leave_the_metrics_alone(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from components.modeling.data import Split
    from components.scoring.model_card import suspect_line

    split = Split(["a.jpg", "b.jpg"], np.array([0, 1]), ["alpha", "beta"])
    report = tmp_path / "label_issues.csv"
    report.write_text(
        "path,split,given_label,suggested_label,score,flagged,excluded\na.jpg,test,alpha,beta,0.1,True,False\n"
    )
    assert evaluation_reports.test_suspects(tmp_path / "absent.csv", None, split, np.array([0, 0])) == ({}, None)
    skipped = SimpleNamespace(suspect_label_splits=None)  # the head's check did not run: a header-only report
    assert evaluation_reports.test_suspects(report, skipped, split, np.array([0, 0])) == ({}, None)
    checked = SimpleNamespace(suspect_label_splits=["train", "val", "test"])
    numbers, left_out = evaluation_reports.test_suspects(report, checked, split, np.array([0, 0]))
    assert numbers == {"n_test_suspects": 1, "accuracy_without_suspects": 0.0}
    assert left_out.to_dict("records") == [{"path": "a.jpg", "given_label": "alpha", "predicted": "alpha"}]
    assert "not checked" in suspect_line({"accuracy": 0.5})


def test_predictions_table_marks_non_finite_outputs(workspace: Path, make_model_dir: ModelDirCopies) -> None:
    model_dir = make_model_dir(workspace / "nan", quality="nan")
    paths = EvaluatePaths(manifest=write_manifest(workspace), model_dir=model_dir, predictions=Path("p.csv"))
    run_evaluate(settings(min_accuracy=0.0), paths.under(workspace))
    rows = read_predictions(workspace / "p.csv")
    assert len(rows) == 12 and {r["predicted"] for r in rows} == {"(no prediction)"}
    assert {r["probability"] for r in rows} == {""}
