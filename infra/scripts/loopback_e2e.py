"""End to end on one machine: real Prefect + MLflow servers, two workers, finetune dispatched to the `gpu` pool.

    python infra/scripts/loopback_e2e.py            (make e2e-loopback)

Everything listens on 127.0.0.1 and lives in a temporary folder:
1. a small real data set (2 flower classes x 20 images), an orchestrator workspace (git + DVC, tiny
   settings) with a local-folder DVC remote, and a `git clone` of it for the GPU worker;
2. `prefect server start` and `mlflow server` (proxied artifacts, so both workers share them over HTTP), both
   on PostgreSQL when a PostgreSQL server is installed here (initdb/pg_ctl/postgres on PATH or under
   /usr/lib/postgresql: a private cluster on 127.0.0.1, a free port, scram-sha-256, two databases), on
   SQLite otherwise; the report's `database` says which, and why;
3. the work pools of `python -m flows.deployments --create-pools`, `prefect --no-prompt deploy --all`,
   a `cpu` worker (TP_GPU_DEPLOYMENT=stage/gpu) and a `gpu` worker, each on its own checkout;
4. `training/on-demand`, checked: completed; finetune ran in a `stage` flow run on the gpu pool and came
   back through DVC's run-cache (not trained again here); a `champion` on the MLflow server; the
   `training-summary` artifact;
5. the same deployment again, with nothing changed: every stage skipped, no new model version.

Writes benchmarks/results/loopback_e2e.json (timings, ids, every check) and exits 1 on any failure,
printing the end of each server and worker log. Every process it starts is stopped on the way out,
also on a timeout (--timeout, default 15 min) or Ctrl-C. Needs no GPU, Docker or network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.workspace import dvc, git  # noqa: E402  (after the sys.path set-up)
from tests.conftest import FLOWERS, KERAS_SEED, copy_subset  # noqa: E402  (after the sys.path set-up)
from tests.integration.conftest import make_tiny_workspace  # noqa: E402  (after the sys.path set-up)

BIN = Path(sys.executable).parent
REPORT = REPO / "benchmarks" / "results" / "loopback_e2e.json"
CLASSES = ("daisy", "sunflowers")
IMAGES_PER_CLASS = 20
GPU_DEPLOYMENT = "stage/gpu"
TRAINING_DEPLOYMENT = "training/on-demand"
SERVER_START_TIMEOUT_S = 240
LOG_TAIL_LINES = 60
QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "DVC_NO_ANALYTICS": "1",
}


class E2EFailure(RuntimeError):
    """The loopback run could not go on (a server, a command or a flow run failed)."""


class HardTimeout(BaseException):
    """The whole run went past --timeout (BaseException: no `except Exception` swallows it)."""


# --------------------------------------------------------------------------- processes
@dataclass
class Services:
    """The long-running processes this script started, each in its own process group, with its log."""

    logs: Path
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen[bytes]:
        log_path = self.logs / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args,
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append((name, proc, log_path))
        return proc

    def check_alive(self) -> None:
        for name, proc, log_path in self.started:
            if proc.poll() is not None:
                raise E2EFailure(f"{name} exited with code {proc.returncode} (log: {log_path})")

    def stop_all(self) -> None:
        """SIGTERM every process group and every descendant (flow runs, stages), then SIGKILL what is left."""
        import psutil

        targets: list[psutil.Process] = []
        for _, proc, _ in reversed(self.started):
            try:
                parent = psutil.Process(proc.pid)
                targets += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for target in targets:
            try:
                target.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(targets, timeout=20)
        for target in alive:
            try:
                target.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for _, proc, _ in self.started:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def print_log_tails(self) -> None:
        for name, _, log_path in self.started:
            lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
            print(f"\n----- {name}: last {LOG_TAIL_LINES} of {len(lines)} lines ({log_path}) -----", file=sys.stderr)
            print("\n".join(lines[-LOG_TAIL_LINES:]), file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, services: Services, what: str) -> float:
    """Poll `url` until it answers 200; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < SERVER_START_TIMEOUT_S:
        services.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return round(time.monotonic() - started, 1)
        except OSError:
            pass
        time.sleep(2)
    raise E2EFailure(f"{what} not healthy at {url} after {SERVER_START_TIMEOUT_S} s")


def run_command(args: list[str], env: dict[str, str], cwd: Path = REPO, timeout_s: float = 300) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise E2EFailure(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


# --------------------------------------------------------------------------- PostgreSQL
def postgres_bin() -> Path | None:
    """The folder of initdb + postgres: on PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    return versions[-1].parent if versions else None


def start_postgres(tmp: Path, services: Services) -> tuple[dict[str, str], str]:
    """A private PostgreSQL cluster on 127.0.0.1 with databases `prefect` and `mlflow`.

    Returns the connection settings (password in them, for the servers' environment only) and a label.
    Runs as the `postgres` user when this process is root (PostgreSQL refuses root). The password goes
    through a file and the environment, never a command line.
    """
    import pwd
    import secrets as secrets_

    bindir = postgres_bin()
    if bindir is None:
        raise E2EFailure("no PostgreSQL server installed (initdb/postgres not found)")
    version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    data, sock = tmp / "pg" / "data", tmp / "pg" / "sock"
    sock.mkdir(parents=True)
    pg_secret = secrets_.token_urlsafe(24)
    pwfile = tmp / "pg" / "pwfile"
    pwfile.write_text(pg_secret + "\n")
    pwfile.chmod(0o600)
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (tmp / "pg", sock, pwfile):
            os.chown(path, user.pw_uid, user.pw_gid)
        tmp.chmod(tmp.stat().st_mode | 0o711)  # postgres must reach its folder
        prefix = ["runuser", "-u", "postgres", "--"]
    done = subprocess.run(
        [
            *prefix,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "tp",
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "--encoding=UTF8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    pwfile.unlink()
    if done.returncode != 0:
        raise E2EFailure(f"initdb failed: {done.stderr.strip()[-500:]}")
    port = free_port()
    services.start(
        "postgres",
        [
            *prefix,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={sock}",
        ],
        {**os.environ, "LC_ALL": "C"},
    )
    env = {**os.environ, "PGPASSFILE": str(pgpass_file(tmp, port, pg_secret))}
    started = time.monotonic()
    while True:
        services.check_alive()
        ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
        if ready.returncode == 0:
            break
        if time.monotonic() - started > 60:
            raise E2EFailure("PostgreSQL did not accept connections within 60 s")
        time.sleep(1)
    for database in ("prefect", "mlflow"):
        subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "tp", database],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    settings = dict(zip(("host", "port", "user", "password"), ("127.0.0.1", str(port), "tp", pg_secret)))
    return settings, f"{version} (private cluster on 127.0.0.1:{port})"


def pgpass_file(tmp: Path, port: int, pg_secret: str) -> Path:
    """libpq's password file (mode 0600), so that createdb/psql take no password argument or variable."""
    path = tmp / "pgpass"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"127.0.0.1:{port}:*:tp:{pg_secret}\n")
    return path


# --------------------------------------------------------------------------- set-up
def base_environment(tmp: Path) -> dict[str, str]:
    """This interpreter's tools first, telemetry off, and none of the caller's servers or workspaces."""
    env = {
        **os.environ,
        **QUIET,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(tmp / "prefect_home"),
        "KERAS_HOME": str(keras_home(tmp)),
    }
    for name in (
        "PREFECT_API_URL",
        "PREFECT_API_KEY",
        "PREFECT_API_AUTH_STRING",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "TP_WORKSPACE",
        "TP_GPU_DEPLOYMENT",
        "TP_NOTIFY_BLOCK",
        "TP_NOTIFY_WEBHOOK_URL",
        "VIRTUAL_ENV_PROMPT",
    ):
        env.pop(name, None)
    return env


def keras_home(tmp: Path) -> Path:
    """KERAS_HOME as given when it holds weights; else a fresh one seeded (symlinks) from the shared folder."""
    given = os.environ.get("KERAS_HOME")
    if given and any(Path(given, "models").glob("*.h5")):
        return Path(given)
    home = tmp / "keras_home"
    (home / "models").mkdir(parents=True, exist_ok=True)
    if KERAS_SEED.is_dir():
        for weights in KERAS_SEED.iterdir():
            link = home / "models" / weights.name
            if not link.exists():
                link.symlink_to(weights.resolve())
    return home


def make_workspaces(tmp: Path, source_root: Path) -> tuple[Path, Path]:
    """The orchestrator's workspace (committed, DVC remote in .dvc/config) and the GPU worker's clone of it."""
    source = tmp / "source"
    for name in CLASSES:
        copy_subset(source_root / name, source / name, IMAGES_PER_CLASS)
    orchestrator = make_tiny_workspace(tmp / "orchestrator", source)
    dvc(orchestrator, "remote", "add", "-d", "storage", str(tmp / "dvc-remote"))
    git(orchestrator, "add", ".dvc/config")
    git(orchestrator, "commit", "-qm", "DVC remote")
    gpu_clone = tmp / "gpu-worker"
    subprocess.run(["git", "clone", "-q", str(orchestrator), str(gpu_clone)], check=True, capture_output=True)
    git(gpu_clone, "config", "user.email", "gpu-worker@transfer-pipeline.local")
    git(gpu_clone, "config", "user.name", "gpu-worker")
    return orchestrator, gpu_clone


# --------------------------------------------------------------------------- checks
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


def run_deployment_and_wait(client: Any, label: str, deadline: float, services: Services) -> Any:
    """Create a run of `label` and poll it (and the workers) until it ends or the deadline passes."""
    deployment = client.read_deployment_by_name(label)
    flow_run = client.create_flow_run_from_deployment(deployment.id)
    print(f"  {label}: flow run {flow_run.id}", flush=True)
    last_state = None
    while True:
        services.check_alive()
        flow_run = client.read_flow_run(flow_run.id)
        state = flow_run.state
        if state and state.name != last_state:
            last_state = state.name
            print(f"    {time.strftime('%H:%M:%S')} {state.name}", flush=True)
        if state and state.is_final():
            return flow_run
        if time.monotonic() > deadline:
            raise E2EFailure(f"{label} run {flow_run.id} still {last_state} at the deadline")
        time.sleep(3)


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


def optional(read: Callable[[], Any]) -> Any:
    """What `read` returns, or None when it fails (the check that uses it then fails, with a reason)."""
    try:
        return read()
    except Exception:  # missing file, unknown run or alias: reported by the check
        return None


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def check_first_run(
    checks: Checks, client: Any, mlflow_client: Any, run: Any, orchestrator: Path, gpu_clone: Path, ids: dict[str, Any]
) -> None:
    checks.check("first run completed", lambda: run.state.is_completed(), lambda: run.state.name)
    stage_runs = [
        r
        for r in stage_flow_runs(client)
        if r.parent_task_run_id and client.read_task_run(r.parent_task_run_id).flow_run_id == run.id
    ]
    ids["stage_flow_runs"] = [str(r.id) for r in stage_runs]
    remote = stage_runs[0] if len(stage_runs) == 1 else None
    checks.check(
        "finetune ran as one `stage` flow run, a child of the training run",
        lambda: remote is not None,
        lambda: f"{len(stage_runs)} stage flow run(s)",
    )
    checks.check(
        "the stage flow run completed on the gpu pool, for finetune",
        lambda: (
            remote.state.is_completed() and remote.work_pool_name == "gpu" and remote.parameters["stage"] == "finetune"
        ),
        lambda: {"state": remote.state.name, "work_pool": remote.work_pool_name, "stage": remote.parameters["stage"]},
    )
    summary = optional(lambda: read_json(orchestrator / "reports" / "run_summary.json")) or {}
    stages = {s["stage"]: s for s in summary.get("stages", [])}
    checks.check(
        "the orchestrator restored finetune from DVC's run-cache",
        lambda: stages["finetune"].get("where") == GPU_DEPLOYMENT,
        lambda: stages["finetune"],
    )
    checks.check(
        "finetune trained in the gpu worker's clone only (checkpoints there, none here)",
        lambda: (
            (gpu_clone / ".checkpoints" / "finetune").is_dir()
            and not (orchestrator / ".checkpoints" / "finetune").exists()
        ),
    )
    checks.check(
        "every stage ran (first run)",
        lambda: len(stages) == 6 and all(s["ran"] for s in stages.values()),
        lambda: {k: s["ran"] for k, s in stages.items()},
    )

    model_name = summary.get("registered_model")
    champion = optional(lambda: mlflow_client.get_model_version_by_alias(model_name, "champion"))
    ids["champion_version"] = champion.version if champion else None
    checks.check(
        "the MLflow server holds a `champion` version",
        lambda: champion is not None,
        lambda: f"{model_name} version {champion.version}",
    )
    finetune_run_id = optional(lambda: read_json(orchestrator / "models" / "finetune" / "run.json")["run_id"])
    ids["finetune_mlflow_run"] = finetune_run_id
    finetune_run = optional(lambda: mlflow_client.get_run(finetune_run_id))
    checks.check(
        "the champion was fine-tuned by the worker's MLflow run",
        lambda: (
            champion.tags.get("finetune_run_id") == finetune_run_id
            and read_json(gpu_clone / "models" / "finetune" / "run.json")["run_id"] == finetune_run_id
            and finetune_run.data.tags.get("stage") == "finetune"
            and finetune_run.info.status == "FINISHED"
        ),
        lambda: {"run": finetune_run_id, "status": finetune_run.info.status},
    )
    in_sync = optional(lambda: dvc(orchestrator, "status", "--cloud").stdout.strip())
    checks.check("the DVC remote holds every output of the run", lambda: "in sync" in in_sync, lambda: in_sync)
    artifact = summary_artifact(client, run.id)
    checks.check(
        "the `training-summary` artifact exists",
        lambda: artifact is not None and "| finetune |" in artifact.data,
        lambda: str(artifact.id) if artifact else "missing",
    )


def check_second_run(
    checks: Checks,
    client: Any,
    mlflow_client: Any,
    run: Any,
    orchestrator: Path,
    model_name: str,
    versions_before: int,
    stage_runs_before: int,
) -> None:
    checks.check("second run completed", lambda: run.state.is_completed(), lambda: run.state.name)
    summary = read_json(orchestrator / "reports" / "run_summary.json")
    checks.check(
        "second run skipped every stage",
        lambda: summary["all_skipped"],
        lambda: {s["stage"]: s["ran"] for s in summary["stages"]},
    )
    artifact = summary_artifact(client, run.id)
    checks.check("second run's summary says nothing changed", lambda: "Nothing changed" in artifact.data)
    checks.check("second run sent nothing to the gpu pool", lambda: len(stage_flow_runs(client)) == stage_runs_before)
    versions = len(mlflow_client.search_model_versions(f"name='{model_name}'"))
    checks.check(
        "second run registered no new model version",
        lambda: versions == versions_before,
        lambda: f"{versions} version(s)",
    )


# --------------------------------------------------------------------------- the run
def loopback(tmp: Path, source_root: Path, deadline: float, services: Services, report: dict[str, Any]) -> Checks:
    timings, ids, checks = report["timings"], report["ids"], Checks()
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()
        print(f"{name}: {timings[name]} s", flush=True)

    orchestrator, gpu_clone = make_workspaces(tmp, source_root)
    lap("workspaces_s")

    env = base_environment(tmp)
    prefect_env, mlflow_env = {}, {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    pg: dict[str, str] = {}
    try:
        pg, label = start_postgres(tmp, services)
        report["database"] = f"postgresql: {label}"
        prefect_env = {
            f"PREFECT_SERVER_DATABASE_{key.upper()}": value
            for key, value in {**pg, "driver": "postgresql+asyncpg", "name": "prefect"}.items()
        }
        mlflow_env = {
            "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{pg['user']}:{pg['password']}@{pg['host']}:{pg['port']}/mlflow"
        }
    except (E2EFailure, OSError, KeyError, subprocess.SubprocessError) as error:
        report["database"] = f"sqlite: PostgreSQL not used ({error})"
    print(f"database: {report['database']}", flush=True)
    lap("database_s")
    prefect_port, mlflow_port = free_port(), free_port()
    api_url, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    # No scheduler: the nightly deployment must not start a run of its own during the test. Database
    # settings (with the password) go through the environment, not the command line.
    services.start(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        {**env, **prefect_env, "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"},
    )
    services.start(
        "mlflow-server",
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
            "--artifacts-destination",
            str(tmp / "mlartifacts"),
        ],
        {**env, **mlflow_env},
    )
    timings["prefect_healthy_s"] = wait_healthy(f"{api_url}/health", services, "Prefect server")
    timings["mlflow_healthy_s"] = wait_healthy(f"{mlflow_url}/health", services, "MLflow server")
    lap("servers_s")

    env.update(PREFECT_API_URL=api_url, MLFLOW_TRACKING_URI=mlflow_url, PREFECT_WORKER_QUERY_SECONDS="3")
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", *QUIET)})
    run_command([sys.executable, "-m", "flows.deployments", "--create-pools"], env)
    run_command([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    lap("pools_and_deploy_s")

    services.start(
        "worker-cpu",
        [str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--type", "process", "--name", "loopback-cpu"],
        {**env, "TP_WORKSPACE": str(orchestrator), "TP_GPU_DEPLOYMENT": GPU_DEPLOYMENT},
    )
    services.start(
        "worker-gpu",
        [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process", "--name", "loopback-gpu"],
        {**env, "TP_WORKSPACE": str(gpu_clone)},
    )

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    mlflow_client = MlflowClient(tracking_uri=mlflow_url)
    with get_client(sync_client=True) as client:
        print("run 1: everything trains, finetune on the gpu pool", flush=True)
        first = run_deployment_and_wait(client, TRAINING_DEPLOYMENT, deadline, services)
        ids["first_run"] = str(first.id)
        lap("first_run_s")
        check_first_run(checks, client, mlflow_client, first, orchestrator, gpu_clone, ids)
        if pg:
            rows = {
                db: optional(
                    lambda db=db, table=table: int(
                        subprocess.run(
                            [
                                str(postgres_bin() / "psql"),
                                "-h",
                                pg["host"],
                                "-p",
                                pg["port"],
                                "-U",
                                pg["user"],
                                "-d",
                                db,
                                "-tAc",
                                f"SELECT count(*) FROM {table}",
                            ],
                            env={**os.environ, "PGPASSFILE": str(tmp / "pgpass")},
                            capture_output=True,
                            text=True,
                            check=True,
                            timeout=30,
                        ).stdout.strip()
                    )
                )
                for db, table in (("mlflow", "runs"), ("prefect", "flow_run"))
            }
            checks.check(
                "both servers keep their state in PostgreSQL (rows in mlflow.runs, prefect.flow_run)",
                lambda: all((n or 0) > 0 for n in rows.values()),
                lambda: rows,
            )
        if not first.state.is_completed():
            return checks
        model_name = read_json(orchestrator / "reports" / "run_summary.json")["registered_model"]
        versions_before = len(mlflow_client.search_model_versions(f"name='{model_name}'"))
        stage_runs_before = len(stage_flow_runs(client))
        clock = time.monotonic()

        print("run 2: nothing changed", flush=True)
        second = run_deployment_and_wait(client, TRAINING_DEPLOYMENT, deadline, services)
        ids["second_run"] = str(second.id)
        lap("second_run_s")
        check_second_run(
            checks, client, mlflow_client, second, orchestrator, model_name, versions_before, stage_runs_before
        )
    return checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python infra/scripts/loopback_e2e.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--timeout", type=float, default=900, help="hard limit for the whole run, seconds")
    parser.add_argument(
        "--source", type=Path, default=FLOWERS, help="a folder of class folders (default: flower_photos)"
    )
    parser.add_argument("--report", type=Path, default=REPORT, help="where the results go (JSON)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (workspaces, logs, databases)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [name for name in CLASSES if not (args.source / name).is_dir()]
    if missing:
        print(
            f"error: {args.source} lacks the class folders {missing} (set TP_SHARED_DIR or --source)", file=sys.stderr
        )
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise HardTimeout(
            f"timed out after {args.timeout:.0f} s" if signum == signal.SIGALRM else f"stopped by signal {signum}"
        )

    for signum in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.alarm(int(args.timeout))
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tp-loopback-"))
    (tmp / "logs").mkdir()
    services = Services(tmp / "logs")
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "passed": False,
        "error": None,
        "database": None,
        "timings": {},
        "ids": {},
        "checks": [],
        "tmp": str(tmp),
    }
    checks = Checks()
    try:
        # Leave a few minutes of the hard limit for the checks and the clean-up.
        checks = loopback(tmp, args.source, started + args.timeout - 60, services, report)
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
        report["timings"]["total_s"] = round(time.monotonic() - started, 1)
        if not report["passed"]:
            services.print_log_tails()
        services.stop_all()
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        if not args.keep and report["passed"]:
            shutil.rmtree(tmp, ignore_errors=True)
    if report["passed"]:
        print(
            f"loopback e2e passed: {len(checks.results)} checks in {report['timings']['total_s']} s, "
            f"database {report['database']} ({args.report})"
        )
        return 0
    failed = [c["name"] for c in checks.results if not c["passed"]]
    print(
        f"loopback e2e FAILED: {report['error'] or ''} {('failed checks: ' + '; '.join(failed)) if failed else ''}\n"
        f"report: {args.report}; logs and workspaces kept in {tmp}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
