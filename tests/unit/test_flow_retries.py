"""The flow retries a stage only when a second try may pass: never for bad settings or data (exit 2)."""

from __future__ import annotations

from types import SimpleNamespace

from components.errors import EXIT_USER_ERROR, cli_errors
from components.tracking import TrackingUnavailable


def _failed(error: BaseException) -> SimpleNamespace:
    return SimpleNamespace(data=error)  # what Prefect hands retry_condition_fn for a raised exception


def test_user_errors_are_not_retried_and_outages_are(monkeypatch, tmp_path):
    from flows.training import StageFailed, retry_if_transient, stage_outcome

    monkeypatch.setenv("TP_STATUS_DIR", str(tmp_path))

    @cli_errors("validate")
    def bad_input() -> int:
        return EXIT_USER_ERROR

    @cli_errors("evaluate")
    def server_down() -> int:
        raise TrackingUnavailable("MLflow at http://127.0.0.1:1 failed")

    assert bad_input() == 2 and server_down() == 1
    assert stage_outcome(tmp_path, "validate") == {"stage": "validate", "exit_code": 2, "kind": "user"}
    assert stage_outcome(tmp_path, "evaluate")["kind"] == "unavailable"
    assert stage_outcome(tmp_path, "finetune") == {}

    assert not retry_if_transient(None, None, _failed(StageFailed("validate failed", retryable=False)))
    assert retry_if_transient(None, None, _failed(StageFailed("evaluate failed")))
    assert retry_if_transient(None, None, _failed(ConnectionError("reset by peer")))
