"""Registry helpers: the promotion gate's decisions, lineage, retries and credential scrubbing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from components.config import Params, PromotionConfig, parse_params
from components.registry import Scores, alias_version, decide_promotion, git_commit, lineage_tags, params_hash
from components.tracking import RetryPolicy, TrackingUnavailable, scrub_credentials, with_retries

GATE = PromotionConfig(min_accuracy=0.8, min_class_recall=0.5, min_improvement=0.02)


def test_first_model_is_judged_on_thresholds_alone() -> None:
    decision = decide_promotion(GATE, Scores(0.9, 0.7, 50))
    assert decision.promoted
    assert any("no champion yet" in r for r in decision.reasons)


@pytest.mark.parametrize("scores, failing", [
    (Scores(0.79, 0.9, 50), "accuracy 0.7900 < min_accuracy 0.8"),
    (Scores(0.95, 0.4, 50), "lowest class recall 0.4000 < min_class_recall 0.5"),
])
def test_model_below_an_absolute_threshold_is_rejected_naming_it(scores: Scores, failing: str) -> None:
    decision = decide_promotion(GATE, scores)
    assert not decision.promoted
    assert f"fail: {failing}" in decision.reasons


def test_challenger_must_beat_rescored_champion_by_the_margin() -> None:
    champion = Scores(0.90, 0.8, 50)
    short = decide_promotion(GATE, Scores(0.91, 0.8, 50), champion, "3")
    enough = decide_promotion(GATE, Scores(0.92, 0.8, 50), champion, "3")
    assert not short.promoted and enough.promoted
    assert any(r.startswith("fail: accuracy 0.9100 < champion v3 re-scored 0.9000") for r in short.reasons)
    tags = short.tags()
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.champion_accuracy"] == "0.900000"
    assert tags["promotion.threshold.min_improvement"] == "0.02"


def test_unscorable_champion_is_named_in_the_reasons() -> None:
    decision = decide_promotion(GATE, Scores(0.9, 0.9, 50), None, "2", "class set differs")
    assert decision.promoted
    assert "class set differs" in decision.tags()["promotion.reasons"]
    assert decision.tags()["promotion.champion_problem"] == "class set differs"


def test_params_hash_changes_with_any_setting() -> None:
    base = Params()
    assert params_hash(base) == params_hash(parse_params({}))
    assert params_hash(base) != params_hash(parse_params({"finetune": {"epochs": 7}}))


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_lineage_names_commit_data_params_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "ingest.json").write_text(json.dumps({"data_version": "abc123"}))
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  ingest:\n    outs:\n"
                                       "    - path: data/raw\n      md5: f00d.dir\n")
    monkeypatch.setenv("TP_PREFECT_FLOW_RUN_ID", "flow-run-7")
    tags = lineage_tags(Params(), {"run_id": "ft1", "head_run_id": "hd1", "backbone": "mobilenet_v2"}, None, tmp_path)
    assert tags["git_commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert tags["data_version"] == "abc123" and tags["data_raw_md5"] == "f00d.dir"
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
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        assert alias_version("nobody", "champion") is None
    finally:
        mlflow.set_tracking_uri(None)
