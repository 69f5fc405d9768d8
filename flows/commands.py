"""Running a command for a flow: the one way tasks start processes (DVC commands and component CLIs alike).

`run_command` runs it in its own process group with this interpreter's tools first on PATH and the Prefect
flow run id in its environment, streams its output to the task's logger, and kills it, with everything it
started, when its timeout passes or the task is interrupted (a Prefect timeout or cancellation): a hung
`dvc repro` must not keep DVC's lock, or the workspace, after its task has given up.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.runtime import flow_run

from components.core.errors import STATUS_DIR_VARIABLE
from flows.limits import StageTimedOut

POLL_S = 0.5  # how often a waiting command loop looks at its deadline (and lets an injected timeout in)
KILL_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this


@dataclass(frozen=True)
class Finished:
    """How a command ended: exit code, output lines (stdout and stderr in one stream, blank lines dropped),
    and the outcome its own process recorded when one was asked for (`outcome_of`)."""

    code: int
    lines: list[str]
    outcome: dict[str, Any] = field(default_factory=dict)

    def tail(self, count: int) -> str:
        return "\n".join(self.lines[-count:])


def stage_outcome(status_dir: Path, stage: str) -> dict[str, Any]:
    """How the stage's own process ended (components.core.errors.record_outcome), {} if it left nothing."""
    path = status_dir / f"{stage}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's folder first on PATH (so `dvc` is this environment's), the flow run id for lineage."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run_id = flow_run.get_id()
    if run_id:
        env["TP_PREFECT_FLOW_RUN_ID"] = str(run_id)
    return {**env, **(extra or {})}


def run_command(
    cmd: list[str],
    workdir: Path | str,
    logger: Any | None = None,
    *,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    outcome_of: str | None = None,
) -> Finished:
    """Run `cmd` in `workdir` (its output streamed to `logger`, if any) and say how it ended.

    Past `timeout_s` (None: no limit) its whole process group is killed and StageTimedOut raised.
    `env` adds to the command environment. `outcome_of`: the name (a stage, `export`) under which the
    process records how it ended, in a status folder made for this run (components/core/errors.py).
    """
    if outcome_of is None:
        code, lines = _streamed(cmd, Path(workdir), command_env(env), logger, timeout_s)
        return Finished(code, lines)
    with tempfile.TemporaryDirectory(prefix="tp-status-") as status_dir:
        extra = {**(env or {}), STATUS_DIR_VARIABLE: status_dir}
        code, lines = _streamed(cmd, Path(workdir), command_env(extra), logger, timeout_s)
        return Finished(code, lines, stage_outcome(Path(status_dir), outcome_of))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the command's process group, SIGKILL whatever is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _pump(stream: Any, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _streamed(
    cmd: list[str], workdir: Path, env: dict[str, str], logger: Any | None, timeout_s: float | None
) -> tuple[int, list[str]]:
    """The process itself: its own group, output read line by line, the deadline checked every POLL_S.

    Any way out other than its end (a timeout here, or a Prefect timeout or cancellation raised into this
    thread) kills it.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: killed with the children it starts
    )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    received: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, received), daemon=True).start()
    lines: list[str] = []
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                _kill_group(proc)
                tail = "\n".join(lines[-10:])
                raise StageTimedOut(f"`{' '.join(cmd[:4])} ...` ran past its timeout of {timeout_s:g} s:\n{tail}")
            try:
                line = received.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if line is None:
                break
            line = line.rstrip()
            if line:
                lines.append(line)
                if logger is not None:
                    logger.info(line)
        while proc.poll() is None:  # output closed; the process may still be finishing
            if deadline is not None and time.monotonic() > deadline:
                _kill_group(proc)
                raise StageTimedOut(f"`{' '.join(cmd[:4])} ...` ran past its timeout of {timeout_s:g} s")
            time.sleep(POLL_S)
        return proc.returncode, lines
    finally:
        if proc.poll() is None:
            _kill_group(proc)
