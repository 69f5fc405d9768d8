"""How the flows bound a run: command timeouts, which failures are retried, one run per workspace.

Settings: `orchestration:` in params.yaml (components.core.orchestration_config.OrchestrationConfig).

- Every command a task starts is killed, with everything it started, past its timeout
  (flows/commands.py's run_command raises StageTimedOut).
- Retries are for outages and killed processes only: a stage that crashed (a bug) or refused its
  input fails the same way on a second try.
- One run per workspace: Prefect's global concurrency limit `orchestration.concurrency_limit` where a
  Prefect server is configured (PREFECT_API_URL), then the workspace's file lock. A run waits up to
  `orchestration.workspace_wait_s` for either instead of failing at once.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from components.core.config import ParamsError
from components.core.errors import EXIT_USER_ERROR, Unavailable
from components.core.orchestration_config import OrchestrationConfig

# Signals sent from outside a process (OOM killer, preemption, shutdown, our own timeout): worth another try.
# SIGSEGV, SIGABRT and the like come from inside, like a traceback: not retried.
OUTSIDE_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
# DVC reports a stage command's end as "failed to run: <cmd>, exited with <status>" (a shell reports a
# signal as 128 + its number, Popen as minus its number).
DVC_EXIT = re.compile(r"exited with (-?\d+)")


class StageTimedOut(TimeoutError):
    """A command ran past its timeout; it was killed with every process it started."""


class FlowTimedOut(TimeoutError):
    """A flow run ran past `orchestration.flow_timeout_s`."""


class WorkspaceBusy(RuntimeError):
    """Another run held the workspace for longer than `orchestration.workspace_wait_s`."""


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message carries the end of its output.

    `retryable` is True only when a second try may pass: an outage (a service did not answer, exit 1
    through components/core/errors.py) or a process killed from outside (signal, OOM killer).
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def retry_outages(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only outages, killed processes and timeouts, never bugs or bad input."""
    error = getattr(state, "data", None)
    if isinstance(error, StageFailed):
        return error.retryable
    if isinstance(error, ParamsError):
        return False
    return isinstance(error, (TimeoutError, ConnectionError, Unavailable))


def killed_from_outside(code: int, lines: list[str]) -> bool:
    """Whether a command (or the stage command DVC ran) ended by a signal sent from outside it."""
    statuses = [code] + [int(m) for line in lines[-25:] for m in DVC_EXIT.findall(line)]
    signals = {-s for s in statuses if s < 0} | {s - 128 for s in statuses if 128 < s < 160}
    return any(s in OUTSIDE_SIGNALS for s in signals)


def failure(what: str, code: int, lines: list[str], outcome: dict[str, Any]) -> StageFailed:
    """The StageFailed for a command that exited `code`, retryable only for an outage or a kill."""
    kind = outcome.get("kind")
    if kind == "unavailable":
        retryable, why = True, "a service did not answer: retried"
    elif outcome.get("exit_code") == EXIT_USER_ERROR or kind == "user":
        retryable, why = False, "input or settings: not retried"
    elif kind is None and killed_from_outside(code, lines):
        retryable, why = True, "killed by a signal: retried"
    elif kind == "crash":
        retryable, why = False, "crashed (a bug): not retried"
    else:
        retryable, why = False, f"exit {code}: not retried"
    return StageFailed(f"{what} failed ({why}):\n" + "\n".join(lines[-25:]), retryable=retryable)


# --- one run per workspace ----------------------------------------------------------------------------


def prefect_server_configured() -> bool:
    """Whether runs talk to a Prefect server (PREFECT_API_URL), not a temporary in-process one."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def ensure_concurrency_limit(name: str) -> None:
    """Create the global concurrency limit `name` with one slot if it does not exist yet (an admin's
    existing limit, whatever its size, is left as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run made it first
                pass


@contextmanager
def workspace_slot(root: Path, lock_file: Path, settings: OrchestrationConfig, logger: Any) -> Iterator[None]:
    """Hold the workspace for one run, waiting up to `settings.workspace_wait_s` for another run to end.

    With a Prefect server the run takes a slot of the global concurrency limit first, so overlapping
    runs (a served on-demand run and the nightly one, say) wait in Prefect's UI. `strict=True`: a limit
    deleted between its creation and the acquisition is an error, never a run without a limit; a failed
    lease renewal (a server blip) does not kill a long training run. Without a server (an in-process
    API, one per process) a slot held by a killed process would never be given back, so the run waits
    on the file lock alone, which the system releases with its holder.
    """
    started = time.monotonic()
    wait = settings.workspace_wait_s
    busy = (
        f"another training run is using the workspace {root} (lock {lock_file}, Prefect concurrency limit "
        f"{settings.concurrency_limit!r}); waited {wait:g} s (orchestration.workspace_wait_s). This run exits "
        "without touching params.yaml, DVC or MLflow state. Retry when it has finished."
    )
    with ExitStack() as stack:
        if prefect_server_configured():
            from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
            from prefect.concurrency.sync import concurrency

            ensure_concurrency_limit(settings.concurrency_limit)
            try:
                stack.enter_context(
                    concurrency(
                        settings.concurrency_limit,
                        # No wait: one try (a timeout of 0 would end before the server answers).
                        timeout_seconds=wait or None,
                        max_retries=None if wait else 0,
                        strict=True,
                        raise_on_lease_renewal_failure=False,
                    )
                )
            except TimeoutError:
                raise WorkspaceBusy(busy) from None
            except ConcurrencySlotAcquisitionError as error:
                if getattr(getattr(error.__cause__, "response", None), "status_code", None) != 423:  # 423: taken
                    raise
                raise WorkspaceBusy(busy) from None
        else:
            logger.info("no Prefect server configured: runs of this workspace queue on its file lock")
        (root / lock_file).parent.mkdir(exist_ok=True)
        lock = FileLock(str(root / lock_file), timeout=max(0.0, wait - (time.monotonic() - started)))
        try:
            lock.acquire()
        except Timeout:
            raise WorkspaceBusy(busy) from None
        stack.callback(lock.release)
        yield


@contextmanager
def flow_deadline(seconds: float, what: str) -> Iterator[None]:
    """End the run with FlowTimedOut past `seconds` (Prefect's own timeout scope: an alarm in the main
    thread, which interrupts blocking calls; the commands of interrupted tasks are killed with them)."""
    from prefect.utilities.timeout import timeout

    try:
        with timeout(seconds=seconds, timeout_exc_type=FlowTimedOut):
            yield
    except FlowTimedOut:
        raise FlowTimedOut(f"{what} ran past orchestration.flow_timeout_s = {seconds:g} s") from None
