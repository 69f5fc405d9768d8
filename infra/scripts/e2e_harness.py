"""What both end-to-end scripts share: the hard time limit, the report and its checks, and the clean-up.

`loopback_e2e.py` (servers on 127.0.0.1) and `docker_e2e.py` (the compose stack) each build their own
world; here is how either run is bounded and told: `execute` runs the body under a hard limit (SIGALRM,
also SIGTERM and Ctrl-C), records any error in the report, then runs the tear-down uninterrupted;
`Checks` records named checks; `client_environment` is the environment the scripts' own commands
(`prefect deploy`, `flows.deployments`) run with, none of the caller's servers in it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The small real data set both runs train on: 2 flower classes x 20 images.
CLASSES = ("daisy", "sunflowers")
IMAGES_PER_CLASS = 20
QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "DVC_NO_ANALYTICS": "1",
}
# The caller's servers, credentials and workspaces: never inherited by what a run starts.
CALLER_SETTINGS = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "TP_WORKSPACE",
    "TP_GPU_DEPLOYMENT",
    "TP_EMBED_DEPLOYMENT",
    "TP_NOTIFY_BLOCK",
    "TP_NOTIFY_WEBHOOK_URL",
    "VIRTUAL_ENV_PROMPT",
)


class E2EFailure(RuntimeError):
    """The run could not go on (a server, a command or a flow run failed)."""


class HardTimeout(BaseException):
    """The whole run went past --timeout (BaseException: no `except Exception` swallows it)."""


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 600, check: bool = True, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """A command to its end; E2EFailure with the end of its output when it fails and `check` is set."""
    done = subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise E2EFailure(
            f"{' '.join(args[:6])}... failed ({done.returncode}):\n{done.stdout[-2500:]}\n{done.stderr[-2500:]}"
        )
    return done


def small_data_set(source_root: Path, folder: Path) -> Path:
    """The data set both runs train on, copied from `source_root`'s class folders into `folder`."""
    from tests.conftest import copy_subset  # the project's root is on sys.path (each script puts it there)

    for name in CLASSES:
        copy_subset(source_root / name, folder / name, IMAGES_PER_CLASS)
    return folder


def client_environment(tmp: Path) -> dict[str, str]:
    """This interpreter's tools first, telemetry off, a Prefect home of the run's own, no caller's settings."""
    env = {
        **os.environ,
        **QUIET,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(tmp / "prefect_home"),
    }
    for name in CALLER_SETTINGS:
        env.pop(name, None)
    return env


def use_servers_here(env: dict[str, str]) -> None:
    """Point this process's own Prefect and MLflow clients (the checks) at the run's servers, as `env` does."""
    os.environ.update({k: env[k] for k in (*CALLER_SETTINGS, "PREFECT_HOME", *QUIET) if k in env})


class Stopwatch:
    """Named timings of a run's steps, each from the end of the one before (`lap`), said as they end."""

    def __init__(self, timings: dict[str, Any], say: Callable[[str], None]) -> None:
        self.timings, self.say = timings, say
        self.restart()

    def restart(self) -> None:
        self.clock = time.monotonic()

    def lap(self, name: str) -> None:
        self.timings[name] = round(time.monotonic() - self.clock, 1)
        self.restart()
        self.say(f"{name}: {self.timings[name]} s")


@dataclass
class Checks:
    results: list[dict[str, Any]] = field(default_factory=list)

    def check(self, name: str, condition: Callable[[], Any], detail: Callable[[], Any] = lambda: "") -> bool:
        """Record a named check; an exception while checking counts as a failure, with its message."""
        try:
            passed, info = bool(condition()), detail()
        except Exception as error:  # a check that cannot be evaluated has failed
            passed, info = False, f"{type(error).__name__}: {error}"
        self.results.append(
            {
                "name": name,
                "passed": passed,
                "detail": info if isinstance(info, (str, int, float, dict, list)) else str(info),
            }
        )
        print(f"  [{'ok' if passed else 'FAIL'}] {name}{f': {info}' if info != '' else ''}", flush=True)
        return passed

    @property
    def all_passed(self) -> bool:
        return bool(self.results) and all(r["passed"] for r in self.results)


def optional(read: Callable[[], Any]) -> Any:
    """What `read` returns, or None when it fails (the check that uses it then fails, with a reason)."""
    try:
        return read()
    except Exception:  # missing file, unknown run or alias: reported by the check
        return None


def stage_flow_runs(client: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["stage"])))


def summary_artifact(client: Any, flow_run_id: Any) -> Any:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["training-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
        )
    )
    return found[0] if found else None


def new_report(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A run's report before it starts: not passed, no error, its temporary folder, and `sections`."""
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "passed": False,
        "error": None,
        **sections,
        "checks": [],
        "tmp": str(tmp),
    }


def execute(
    timeout_s: float, report: dict[str, Any], checks: Checks, body: Callable[[], Any], teardown: Callable[[bool], None]
) -> bool:
    """Run `body` within `timeout_s` (then HardTimeout, as on SIGTERM or Ctrl-C), its error into the report;
    then `teardown(passed)` with those signals ignored, so that the clean-up always ends. Whether it passed."""

    def on_signal(signum: int, _frame: Any) -> None:
        raise HardTimeout(
            f"timed out after {timeout_s:.0f} s" if signum == signal.SIGALRM else f"stopped by signal {signum}"
        )

    for signum in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.alarm(int(timeout_s))
    try:
        body()
    except (E2EFailure, HardTimeout, subprocess.TimeoutExpired) as error:
        report["error"] = str(error)
    except Exception as error:  # report whatever broke, with its type, then clean up
        report["error"] = f"{type(error).__name__}: {error}"
    finally:
        signal.alarm(0)
        for signum in (signal.SIGTERM, signal.SIGINT):  # the clean-up below must not be interrupted
            signal.signal(signum, signal.SIG_IGN)
        report["checks"] = checks.results
        report["passed"] = report["error"] is None and checks.all_passed
        teardown(report["passed"])
    return report["passed"]


def stop_all(processes: list[Any], how: str, wait_s: float) -> list[Any]:
    """`how` ("terminate" or "kill") every psutil process (one already gone is skipped), wait up to `wait_s`
    for them to end; the ones still alive."""
    import psutil

    for process in processes:
        try:
            getattr(process, how)()
        except psutil.NoSuchProcess:
            pass
    return psutil.wait_procs(processes, timeout=wait_s)[1]


def print_failure(name: str, report: dict[str, Any], checks: Checks, where: str) -> None:
    """`NAME FAILED: error, failed checks`, then where the report and the kept files are."""
    failed = [c["name"] for c in checks.results if not c["passed"]]
    print(
        f"{name} FAILED: {report['error'] or ''} {('failed checks: ' + '; '.join(failed)) if failed else ''}\n{where}",
        file=sys.stderr,
    )
