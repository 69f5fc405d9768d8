"""The flow retries only what may pass on a second try (outages, killed processes), and nothing runs forever.

Real processes: a stage CLI that crashes, one whose service is down, one killed by a signal, one that hangs.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from components.core.config import ParamsError
from components.core.errors import EXIT_USER_ERROR, cli_errors
from components.core.orchestration_config import OrchestrationConfig
from components.core.tracking_connection import TrackingUnavailable
from flows.commands import run_command, stage_outcome
from flows.limits import StageFailed, StageTimedOut, failure, retry_outages


def _failed(error: BaseException) -> SimpleNamespace:
    return SimpleNamespace(data=error)  # what Prefect hands retry_condition_fn for a raised exception


# A stage CLI under components.core.errors.cli_errors, ending the way argv[1] says.
STAGE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from components.core.errors import cli_errors
    from components.core.tracking_connection import TrackingUnavailable

    @cli_errors("train_head")
    def main():
        how = sys.argv[1]
        if how == "crash":
            raise KeyError("a bug")
        if how == "outage":
            raise TrackingUnavailable("MLflow at http://127.0.0.1:1 failed to log after 4 attempts")
        if how == "bad-input":
            return 2
        os.kill(os.getpid(), getattr(signal, how))

    sys.exit(main())
    """
)


def run_stage(how: str) -> StageFailed:
    """Run the fake stage the way the flow does (own process group, status folder) and classify its end."""
    env = {"PYTHONPATH": str(Path.cwd())}
    done = run_command(
        [sys.executable, "-c", STAGE_SCRIPT, how], Path.cwd(), env=env, timeout_s=60, outcome_of="train_head"
    )
    assert done.code != 0
    return failure("stage 'train_head'", done.code, done.lines, done.outcome)


@pytest.mark.parametrize(
    ("how", "retried", "why"),
    [
        ("crash", False, "crashed (a bug): not retried"),
        ("outage", True, "a service did not answer: retried"),
        ("bad-input", False, "input or settings: not retried"),
        ("SIGKILL", True, "killed by a signal: retried"),  # OOM killer, preemption
        ("SIGSEGV", False, "not retried"),  # a crash in native code comes from inside, like a traceback
    ],
)
def test_crashes_are_not_retried_outages_and_killed_processes_are(how, retried, why):
    error = run_stage(how)
    assert why in str(error)
    assert error.retryable is retried
    assert retry_outages(None, None, _failed(error)) is retried


def test_a_killed_stage_is_recognised_through_dvc_s_report():
    # dvc repro exits 255 and names the stage command's status: minus the signal, or 128 + it from a shell.
    for said in ("exited with -9", "exited with 137", "exited with 143"):
        lines = ["Running stage 'finetune':", f"ERROR: failed to reproduce 'finetune': failed to run: python, {said}"]
        assert failure("stage 'finetune'", 255, lines, {}).retryable, said
    lines = ["ERROR: failed to reproduce 'finetune': failed to run: python, exited with 1"]  # died before cli_errors
    assert not failure("stage 'finetune'", 255, lines, {}).retryable
    assert not failure("stage 'finetune'", 255, ["exited with 139"], {}).retryable  # SIGSEGV


def test_outcomes_are_recorded_for_the_retry_decision(monkeypatch, tmp_path):
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


def test_only_outages_and_timeouts_are_retried_among_other_errors():
    assert retry_outages(None, None, _failed(ConnectionError("reset by peer")))
    assert retry_outages(None, None, _failed(StageTimedOut("ran past its timeout")))
    assert retry_outages(None, None, _failed(TrackingUnavailable("down")))
    assert not retry_outages(None, None, _failed(KeyError("a bug in the flow")))
    assert not retry_outages(None, None, _failed(ParamsError("epochs: -1")))
    assert not retry_outages(None, None, _failed(StageFailed("validate failed")))


HANGING = textwrap.dedent(
    """
    import subprocess, sys, time
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(f"started pid {sleeper.pid}", flush=True)
    time.sleep(120)
    """
)


def test_a_hung_stage_times_out_and_its_processes_are_killed(monkeypatch, tmp_path):
    import logging

    import flows.dvc_workspace as dvc_workspace
    import flows.stage_tasks as stage_tasks

    def hanging_dvc(cmd, workdir, logger=None, **options):
        assert cmd[:3] == ["dvc", "repro", "--single-item"]
        return run_command([sys.executable, "-c", HANGING], workdir, logger, **options)

    monkeypatch.setattr(dvc_workspace, "run_command", hanging_dvc)
    monkeypatch.setattr(stage_tasks, "stage_is_current", lambda *args: False)
    monkeypatch.setattr(stage_tasks, "get_run_logger", lambda: logging.getLogger("test"))
    started = time.monotonic()
    with pytest.raises(StageTimedOut, match="ran past its timeout of 2 s") as timed_out:
        stage_tasks.STAGE_TASKS["finetune"].fn(str(tmp_path), timeout_s=2)
    assert time.monotonic() - started < 20
    assert retry_outages(None, None, _failed(timed_out.value))
    child = int(re.search(r"started pid (\d+)", str(timed_out.value))[1])  # the stage's output ends the message
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the stage's child process outlived its timeout"
        time.sleep(0.1)


def test_an_interrupted_command_takes_its_processes_with_it(tmp_path):
    """A Prefect timeout or cancellation raised into the task's thread kills the command too."""
    marker = tmp_path / "pid"
    script = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"

    def interrupt(*args):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_command([sys.executable, "-c", script], tmp_path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(marker.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_stage_tasks_take_timeout_retries_and_jitter_from_the_settings():
    from flows.dvc_workspace import STAGES
    from flows.stage_tasks import export_champion, stage_task, step_task

    settings = OrchestrationConfig(
        stage_timeout_s={"finetune": 123.0}, stage_retries={"finetune": 3, "validate": 0}, retry_jitter_factor=0.25
    )
    finetune = stage_task("finetune", settings)
    assert (finetune.timeout_seconds, finetune.retries, finetune.retry_jitter_factor) == (123.0, 3, 0.25)
    assert finetune.retry_delay_seconds == settings.retry_delays_s
    assert finetune.retry_condition_fn is retry_outages
    assert stage_task("validate", settings).retries == 0
    assert {s: stage_task(s, OrchestrationConfig()).timeout_seconds for s in STAGES} == dict(
        OrchestrationConfig().stage_timeout_s
    )
    export = step_task(export_champion, settings)
    assert (export.timeout_seconds, export.retry_condition_fn) == (settings.step_timeout_s, retry_outages)


def test_batch_prediction_is_bounded_and_retried_only_after_an_outage():
    from flows.predict import scoring_task

    settings = OrchestrationConfig(predict_timeout_s=30.0, predict_retries=1, retry_jitter_factor=0.25)
    scoring = scoring_task(settings)
    assert (scoring.timeout_seconds, scoring.retries, scoring.retry_jitter_factor) == (30.0, 1, 0.25)
    assert scoring.retry_condition_fn is retry_outages
    assert retry_outages(None, None, _failed(TrackingUnavailable("registry down")))  # an outage: retried
    assert not retry_outages(None, None, _failed(ValueError("photos/: no images found")))  # bad input: not
    assert scoring_task(OrchestrationConfig(predict_retries=0)).retry_delay_seconds == 0


def test_a_component_past_its_timeout_is_killed():
    with pytest.raises(StageTimedOut, match="ran past its timeout"):
        run_command([sys.executable, "-c", "import time; time.sleep(60)"], ".", timeout_s=1)
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


def test_dvc_internals_are_used_only_where_no_public_api_exists():
    """Each use of DVC's Python internals (dvc.repo.Repo) in flows/ says why no public API would do."""
    flows = Path(__file__).resolve().parents[2] / "flows"
    for module in flows.glob("*.py"):
        lines = module.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "from dvc.repo import Repo" in line:
                above = "\n".join(lines[max(0, i - 4) : i])
                assert "DVC internals on purpose" in above, f"{module.name}:{i + 1}: say why no public DVC API fits"


def test_commands_run_this_environment_s_tools_first(monkeypatch, tmp_path):
    """`dvc` in a command is this interpreter's (its folder leads PATH), whatever PATH the flow was started with."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    done = run_command(["python", "-c", "import sys; print(sys.prefix)"], tmp_path)
    assert (done.code, done.lines) == (0, [sys.prefix])
