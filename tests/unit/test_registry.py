"""Registry helpers: the promotion gate's decisions, lineage, retries, credential scrubbing, safe loading, packaging."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from components.core.config import Params, parse_params
from components.core.contracts import IngestReport, ModelRunInfo, ScoresRecord, ValidationSummary
from components.core.credentials import scrub_credentials
from components.core.evaluate_config import PromotionConfig
from components.core.tracking_connection import RetryPolicy, TrackingUnavailable, with_retries
from components.lifecycle.lineage import data_versions, git_commit, lineage_tags, params_hash
from components.lifecycle.model_packaging import SERVING_MODEL, code_closure
from components.lifecycle.promotion import decide_promotion, promotion_tags, refused
from components.lifecycle.registry import alias_version
from components.scoring.scoring import UnsafeModel, check_logged_model
from tests.evalkit import CLASSES, migrated_store, run_info, write_stage_reports

GATE = PromotionConfig(min_accuracy=0.8, min_class_recall=0.5, min_improvement=0.02)


def scores(
    accuracy: float, min_recall: float, n: int = 50, per_class: dict[str, float] | None = None, non_finite: int = 0
) -> ScoresRecord:
    return ScoresRecord(
        accuracy=accuracy,
        min_class_recall=min_recall,
        n_test=n,
        non_finite_rows=non_finite,
        per_class_recall=per_class or {"a": min_recall, "b": accuracy},
    )


def test_first_model_is_judged_on_thresholds_alone() -> None:
    decision = decide_promotion(GATE, scores(0.9, 0.7))
    assert decision.promoted
    assert any("no champion yet" in r for r in decision.reasons)


@pytest.mark.parametrize(
    "challenger, failing",
    [
        (scores(0.79, 0.9), "accuracy 0.7900 < min_accuracy 0.8"),
        (scores(0.95, 0.4), "lowest class recall 0.4000 < min_class_recall 0.5"),
    ],
)
def test_model_below_an_absolute_threshold_is_rejected_naming_it(challenger: ScoresRecord, failing: str) -> None:
    decision = decide_promotion(GATE, challenger)
    assert not decision.promoted
    assert f"fail: {failing}" in decision.reasons


def test_challenger_must_beat_rescored_champion_by_the_margin() -> None:
    champion = scores(0.90, 0.8, per_class={"a": 0.8, "b": 0.9})
    short = decide_promotion(GATE, scores(0.91, 0.8, per_class={"a": 0.8, "b": 0.9}), champion, "3")
    enough = decide_promotion(GATE, scores(0.92, 0.8, per_class={"a": 0.8, "b": 0.9}), champion, "3")
    assert not short.promoted and enough.promoted
    assert any(r.startswith("fail: accuracy 0.9100 < champion v3 re-scored 0.9000") for r in short.reasons)
    tags = promotion_tags(short)
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.champion_accuracy"] == "0.900000"
    assert tags["promotion.threshold.min_improvement"] == "0.02"
    assert tags["promotion.threshold.promote_on_tie"] == "false"


def test_champion_that_cannot_be_rescored_keeps_its_place() -> None:
    decision = decide_promotion(GATE, scores(0.99, 0.99), None, "2", "could not load or run it: OSError: gone")
    assert not decision.promoted
    assert any(
        r.startswith("fail: champion v2 could not be re-scored (could not load or run it") for r in decision.reasons
    )
    assert promotion_tags(decision)["promotion.champion_problem"] == "could not load or run it: OSError: gone"


def test_changed_class_set_promotes_only_when_the_setting_allows_it() -> None:
    refused = decide_promotion(GATE, scores(0.99, 0.99), None, "2", "class set differs", class_set_changed=True)
    allowed = decide_promotion(
        PromotionConfig(**{**GATE.model_dump(), "allow_class_set_change": True}),
        scores(0.99, 0.99),
        None,
        "2",
        "class set differs",
        class_set_changed=True,
    )
    assert not refused.promoted and any("allow_class_set_change lets" in r for r in refused.reasons)
    assert allowed.promoted and any("allow_class_set_change is on" in r for r in allowed.reasons)


def test_a_tie_promotes_only_with_promote_on_tie() -> None:
    no_margin = PromotionConfig(min_accuracy=0.5)
    champion = scores(0.9, 0.8, per_class={"a": 0.8, "b": 1.0})
    tie = scores(0.9 + 1e-12, 0.8, per_class={"a": 0.8, "b": 1.0})
    refused = decide_promotion(no_margin, tie, champion, "4")
    allowed = decide_promotion(PromotionConfig(min_accuracy=0.5, promote_on_tie=True), tie, champion, "4")
    assert not refused.promoted and any("ties champion v4" in r for r in refused.reasons)
    assert allowed.promoted


def test_a_class_whose_recall_falls_too_far_blocks_promotion() -> None:
    config = PromotionConfig(min_accuracy=0.5, max_class_recall_drop=0.03)
    champion = scores(0.80, 0.7, per_class={"a": 0.9, "b": 0.7, "c": 0.8})
    collapsed = scores(0.85, 0.6, per_class={"a": 1.0, "b": 0.95, "c": 0.6})  # better overall, c collapses
    slight = scores(0.85, 0.78, per_class={"a": 1.0, "b": 0.78, "c": 0.78})  # c falls 0.02: within the drop
    refused = decide_promotion(config, collapsed, champion, "5")
    assert not refused.promoted
    assert any("max_class_recall_drop 0.03 below champion v5 for c (0.8000 -> 0.6000)" in r for r in refused.reasons)
    assert decide_promotion(config, slight, champion, "5").promoted


def test_non_finite_outputs_are_never_promoted() -> None:
    decision = decide_promotion(PromotionConfig(min_accuracy=0.0), scores(0.9, 0.9, non_finite=3))
    assert not decision.promoted
    assert any("3 of 50 test images got non-finite (NaN/inf) probabilities" in r for r in decision.reasons)


def test_decision_is_written_through_the_promotion_contract(tmp_path: Path) -> None:
    from components.core.contracts import PromotionRecord

    decision = decide_promotion(GATE, scores(0.9, 0.7), registered_model="m", run_id="run", lineage={"git_commit": "x"})
    decision.model_copy(update={"version": "1"}).write(tmp_path / "promotion.json")
    back = PromotionRecord.read(tmp_path / "promotion.json")
    assert back.promoted and back.challenger.accuracy == 0.9 and back.thresholds["promote_on_tie"] is False
    assert (back.registered_model, back.version, back.run_id, back.lineage) == ("m", "1", "run", {"git_commit": "x"})


def test_a_refusal_keeps_the_decision_and_adds_why_without_changing_the_original() -> None:
    decision = decide_promotion(GATE, scores(0.9, 0.7))
    later = refused(decision, "the champion alias moved")
    assert decision.promoted and not later.promoted
    assert later.reasons == [*decision.reasons, "fail: the champion alias moved"]
    assert promotion_tags(later)["promotion.decision"] == "rejected"


def test_params_hash_changes_with_any_setting() -> None:
    base = Params()
    assert params_hash(base) == params_hash(parse_params({}))
    assert params_hash(base) != params_hash(parse_params({"finetune": {"epochs": 7}}))


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_lineage_names_commit_data_params_and_runs_from_the_contracts_not_dvc_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x")
    write_stage_reports(tmp_path, data_version="abc123", validated_version="val456")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    outs:\n    - path: data/raw\n      md5: f00d.dir\n"
    )
    monkeypatch.setenv("TP_PREFECT_FLOW_RUN_ID", "flow-run-7")
    info = ModelRunInfo(
        **{**run_info(CLASSES, run_id="ft1", head_run_id="hd1", data_version="trained789"), "backbone": "mobilenet_v2"},
        model_sha256="0" * 64,
    )
    versions = data_versions(
        IngestReport.read(tmp_path / "reports" / "ingest.json"),
        ValidationSummary.read(tmp_path / "reports" / "validation" / "summary.json"),
        info,
    )
    tags = lineage_tags(Params(), info, None, versions, tmp_path)
    assert tags["git_commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert (tags["data_version"], tags["validated_version"], tags["model_data_version"]) == (
        "abc123",
        "val456",
        "trained789",
    )
    assert "data_raw_md5" not in tags  # dvc.lock is DVC's, not a hand-off file
    assert tags["params_sha256"] == params_hash(Params())
    assert (tags["finetune_run_id"], tags["head_run_id"], tags["backbone"]) == ("ft1", "hd1", "mobilenet_v2")
    assert tags["prefect_flow_run_id"] == "flow-run-7"


def test_commit_is_marked_dirty_when_tracked_files_changed(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "x")
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(tmp_path).endswith("+dirty")


def test_commit_is_unknown_outside_git(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"


def test_credentials_are_scrubbed_from_free_text() -> None:
    text = "request to https://alice:hunter2@mlflow.example.com/api failed"
    assert scrub_credentials(text) == "request to https://***@mlflow.example.com/api failed"


def test_transient_failures_are_retried_then_succeed() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE)
        return "ok"

    assert with_retries("do it", flaky, policy=RetryPolicy(attempts=3, first_wait_s=0)) == "ok"
    assert len(calls) == 3


def test_permanent_errors_are_not_retried() -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        raise MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException):
        with_retries("do it", missing, policy=RetryPolicy(attempts=5, first_wait_s=0))
    assert len(calls) == 1


def test_exhausted_retries_name_the_server_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow.set_tracking_uri("http://bob:s3cret@127.0.0.1:9")
    try:

        def down() -> None:
            raise MlflowException("API request to http://bob:s3cret@127.0.0.1:9 failed", error_code=INTERNAL_ERROR)

        with pytest.raises(TrackingUnavailable) as caught:
            with_retries("register", down, policy=RetryPolicy(attempts=2, first_wait_s=0))
    finally:
        mlflow.set_tracking_uri(None)
    message = str(caught.value)
    assert "***@127.0.0.1:9" in message and "s3cret" not in message and "after 2 attempts" in message


def test_alias_of_an_unknown_model_is_none(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(migrated_store(tmp_path / "mlflow.db"))
    try:
        assert alias_version("nobody", "champion") is None
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("visible, expected", [([], None), (["image-classifier"], "raises")])
def test_a_403_for_a_model_nobody_may_see_means_no_champion_and_otherwise_fails(
    visible: list[str], expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow basic auth answers 403 to a non-admin's alias read of a model that does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    def denied(self, name: str, alias: str):
        raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", denied)
    monkeypatch.setattr(MlflowClient, "search_registered_models", lambda self, **kwargs: list(visible))
    policy = RetryPolicy(attempts=1, first_wait_s=0)
    if expected is None:
        assert alias_version("image-classifier", "champion", policy) is None
    else:
        with pytest.raises(MlflowException, match="Permission denied"):
            alias_version("image-classifier", "champion", policy)


def _logged_dir(root: Path, flavor: dict, files: dict[str, bytes] | None = None) -> Path:
    import yaml

    root.mkdir()
    (root / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": flavor}}))
    for name, data in (files or {}).items():
        (root / name).write_bytes(data)
    return root


def test_a_pickled_pyfunc_is_refused_before_loading(tmp_path: Path) -> None:
    pickled = _logged_dir(
        tmp_path / "old",
        {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"},
        {"python_model.pkl": b"\x80\x04cos\nsystem\n."},
    )
    with pytest.raises(UnsafeModel, match="pickled pyfunc"):
        check_logged_model(pickled)
    stray = _logged_dir(
        tmp_path / "stray",
        {"loader_module": "mlflow.pyfunc.loaders.code_model", "config": {"keras_sha256": "a" * 64}},
        {"extra.pkl": b"x"},
    )
    with pytest.raises(UnsafeModel, match="pickled pyfunc"):
        check_logged_model(stray)


def test_a_model_whose_hash_differs_from_the_registered_one_is_refused(tmp_path: Path) -> None:
    logged = _logged_dir(
        tmp_path / "m", {"loader_module": "mlflow.pyfunc.loaders.code_model", "config": {"keras_sha256": "a" * 64}}
    )
    assert check_logged_model(logged, "a" * 64)["config"]["keras_sha256"] == "a" * 64
    with pytest.raises(UnsafeModel, match="sha256 differs"):
        check_logged_model(logged, "b" * 64)


def test_the_served_code_package_holds_every_module_the_model_imports() -> None:
    package = code_closure(SERVING_MODEL)
    assert {
        "__init__.py",
        "scoring/__init__.py",
        "scoring/serving_model.py",
        "modeling/model_folder.py",
        "ingestion/images.py",
        "modeling/backbones.py",
        "core/__init__.py",
        "core/contracts.py",
        "core/config.py",
        "core/files.py",
        "core/hashing.py",
    } <= package
    stems = {Path(name).stem for name in package}
    no_stage_code = {"evaluate", "registry", "promotion", "model_packaging", "predict", "ingest"}
    assert not no_stage_code & stems  # no stage code (or the code that logs the model) travels


def test_the_served_code_package_imports_on_its_own(tmp_path: Path) -> None:
    """Copied out with its layers, the package loads the served model from the copy alone."""
    import json
    import subprocess
    import sys

    from components.lifecycle.model_packaging import code_package

    code_package(tmp_path)
    probe = (
        "import json, sys, components.scoring.serving_model; "
        "loaded = {n: getattr(m, '__file__', None) for n, m in sys.modules.items() if n.startswith('components')}; "
        "print(json.dumps(loaded))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # `python -c` puts the working folder first on the path
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "components.scoring.serving_model" in loaded
    assert all(str(tmp_path) in (path or "") for path in loaded.values()), loaded
