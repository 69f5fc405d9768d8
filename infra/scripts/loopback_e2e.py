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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_harness import (  # noqa: E402  (after the sys.path set-up above)
    BIN,
    CLASSES,
    Checks,
    E2EFailure,
    Stopwatch,
    client_environment,
    execute,
    new_report,
    optional,
    print_failure,
    run,
    small_data_set,
    stage_flow_runs,
    use_servers_here,
)
from loopback_checks import (  # noqa: E402  (after the sys.path set-up above)
    GPU_DEPLOYMENT,
    TRAINING_DEPLOYMENT,
    check_first_run,
    check_second_run,
    read_json,
    run_deployment_and_wait,
)
from loopback_services import (  # noqa: E402  (after the sys.path set-up above)
    Services,
    free_port,
    postgres_bin,
    start_postgres,
    wait_healthy,
)

from benchmarks.workspace import dvc, git  # noqa: E402  (after the sys.path set-up)
from tests.conftest import FLOWERS, KERAS_SEED  # noqa: E402  (after the sys.path set-up)
from tests.integration.conftest import make_tiny_workspace  # noqa: E402  (after the sys.path set-up)

REPORT = REPO / "benchmarks" / "results" / "loopback_e2e.json"


# --------------------------------------------------------------------------- set-up
def base_environment(tmp: Path) -> dict[str, str]:
    """The harness's client environment, with Keras weights that need no download."""
    return {**client_environment(tmp), "KERAS_HOME": str(keras_home(tmp))}


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
    source = small_data_set(source_root, tmp / "source")
    orchestrator = make_tiny_workspace(tmp / "orchestrator", source)
    dvc(orchestrator, "remote", "add", "-d", "storage", str(tmp / "dvc-remote"))
    git(orchestrator, "add", ".dvc/config")
    git(orchestrator, "commit", "-qm", "DVC remote")
    gpu_clone = tmp / "gpu-worker"
    subprocess.run(["git", "clone", "-q", str(orchestrator), str(gpu_clone)], check=True, capture_output=True)
    git(gpu_clone, "config", "user.email", "gpu-worker@transfer-pipeline.local")
    git(gpu_clone, "config", "user.name", "gpu-worker")
    return orchestrator, gpu_clone


# --------------------------------------------------------------------------- the run
def loopback(
    tmp: Path, source_root: Path, deadline: float, services: Services, report: dict[str, Any], checks: Checks
) -> None:
    """Every step; checks are recorded into `checks` as they pass or fail, so a later error keeps them."""
    timings, ids = report["timings"], report["ids"]
    watch = Stopwatch(timings, lambda message: print(message, flush=True))
    lap = watch.lap

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
    use_servers_here(env)
    run([sys.executable, "-m", "flows.deployments", "--create-pools"], env, timeout=300)
    run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env, timeout=300)
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
            return
        model_name = read_json(orchestrator / "reports" / "run_summary.json")["registered_model"]
        versions_before = len(mlflow_client.search_model_versions(f"name='{model_name}'"))
        stage_runs_before = len(stage_flow_runs(client))
        watch.restart()

        print("run 2: nothing changed", flush=True)
        second = run_deployment_and_wait(client, TRAINING_DEPLOYMENT, deadline, services)
        ids["second_run"] = str(second.id)
        lap("second_run_s")
        check_second_run(
            checks, client, mlflow_client, second, orchestrator, model_name, versions_before, stage_runs_before
        )


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
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tp-loopback-"))
    (tmp / "logs").mkdir()
    services = Services(tmp / "logs")
    report = new_report(tmp, database=None, timings={}, ids={})
    checks = Checks()

    def run_it() -> None:
        # Leave a few minutes of the hard limit for the checks and the clean-up.
        loopback(tmp, args.source, started + args.timeout - 60, services, report, checks)

    def tear_down(passed: bool) -> None:
        report["timings"]["total_s"] = round(time.monotonic() - started, 1)
        if not passed:
            services.print_log_tails()
        services.stop_all()
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        if not args.keep and passed:
            shutil.rmtree(tmp, ignore_errors=True)

    if execute(args.timeout, report, checks, run_it, tear_down):
        print(
            f"loopback e2e passed: {len(checks.results)} checks in {report['timings']['total_s']} s, "
            f"database {report['database']} ({args.report})"
        )
        return 0
    print_failure("loopback e2e", report, checks, f"report: {args.report}; logs and workspaces kept in {tmp}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
