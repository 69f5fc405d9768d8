"""End to end in containers: the compose stack built and run here, training dispatched to the gpu pool.

    python infra/scripts/docker_e2e.py            (make e2e-docker)

1. a Docker daemon: the one DOCKER_HOST names if it answers, else a private `dockerd` (vfs storage, no
   bridge, no iptables) under a temporary folder, stopped at the end;
2. the base image: Debian bookworm from `debootstrap`, `docker import`ed (infra/scripts/build_base_image.sh);
3. the images of infra/ (postgres, s3 stand-in, prefect, mlflow, cpu worker) from their lock files, pip
   reading a wheelhouse that the host's pip downloaded (served on 127.0.0.1 to `docker build`); sizes,
   users and the absence of pip/compilers are checked;
4. a placeholder secret in the env file: the stack must refuse to start;
5. `docker compose up` of infra/docker-compose.yml + infra/e2e/compose.e2e.yml with generated secrets:
   PostgreSQL, moto's S3 + IAM server (MinIO's stand-in), store-init (a user + policy per role, enforced),
   Prefect and MLflow (basic auth) on PostgreSQL, a `cpu` worker and the `gpu` pool's worker (CPU image);
6. pools and deployments (`flows.deployments --create-pools`, `prefect deploy --all`) from this host;
7. run 1 of `training/on-demand` (2 flower classes x 20 images, tiny settings, 6 fine-tune epochs with no
   early stop): a watcher reads the fine-tune epoch log on the gpu worker's volume from the host every
   0.25 s and kills the worker's container (SIGKILL) once an epoch has finished; its stage run is
   marked Crashed, the container started again, and the training run's task retry sends the stage again,
   which resumes from the checkpoint on the worker's volume. Checked: completed, resumed (same MLflow run),
   champion on the MLflow server, its artifacts in the object store, DVC remote in sync, role keys
   limited as their policies say;
8. run 2 from the scheduled deployment `training/nightly`: every stage skipped, nothing dispatched, no new
   model version;
9. tear-down: `compose down --volumes`, images removed, the daemon stopped and its folder deleted.

Writes benchmarks/results/e2e_docker.{json,md} and exits 1 on any failure (the full logs of every
container, and the Prefect logs of a failed flow run, are kept in the temporary folder; their ends are
printed). Bounded: --timeout (default 75 min) ends everything it started.

`make e2e-docker` takes no arguments; these variables set the options' defaults: TP_E2E_BASE_IMAGE
(--base-image), TP_E2E_KEEP_IMAGES=1 (--keep-images), TP_E2E_KEEP=1 (--keep).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docker_checks import check_first_run, flow_run_logs, write_markdown  # noqa: E402  (after the sys.path set-up)
from docker_images import Daemon, start_daemon_and_build_images  # noqa: E402  (after the sys.path set-up)
from docker_stack import (  # noqa: E402  (after the sys.path set-up)
    FINETUNE_EPOCHS,
    FinetuneKiller,
    start_stack,
    take_down,
)
from e2e_harness import (  # noqa: E402  (after the sys.path set-up)
    BIN,
    Checks,
    E2EFailure,
    Stopwatch,
    client_environment,
    execute,
    log,
    new_report,
    optional,
    print_failure,
    run,
    small_data_set,
    stage_flow_runs,
    use_servers_here,
)

from benchmarks.workspace import git  # noqa: E402  (after the sys.path set-up)
from tests.conftest import FLOWERS, KERAS_SEED  # noqa: E402  (after the sys.path set-up)
from tests.integration.conftest import make_tiny_workspace  # noqa: E402  (after the sys.path set-up)

RESULTS = REPO / "benchmarks" / "results"
TRAINING = "training/on-demand"
SCHEDULED = "training/nightly"
FINETUNE_SETTINGS = {"epochs": FINETUNE_EPOCHS, "warmup_epochs": 0, "early_stopping_patience": FINETUNE_EPOCHS}


def prepare_workspace(tmp: Path, source_root: Path) -> dict[str, Any]:
    """A small real data set, a tiny-settings workspace (git + DVC) the workers clone, Keras weights offline:
    what the stack mounts (repo, branch, source, keras)."""
    source = small_data_set(source_root, tmp / "source")
    repo = make_tiny_workspace(tmp / "repo", source, finetune=FINETUNE_SETTINGS)
    branch = git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip()
    keras = tmp / "keras"
    (keras / "models").mkdir(parents=True)
    for weights in KERAS_SEED.glob("*.h5"):
        shutil.copy(weights, keras / "models" / weights.name)
    for path in (keras, keras / "models"):  # Keras ignores a KERAS_HOME it cannot write
        path.chmod(0o777)
    for path in [tmp, *(p for top in (source, repo, keras) for p in [top, *top.rglob("*")])]:
        # the containers' user (uid 10001) reads these through bind mounts
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))
    return {"repo": repo, "branch": branch, "source": source, "keras": keras}


# --------------------------------------------------------------------------- the run
def e2e(
    tmp: Path, args: argparse.Namespace, daemon: Daemon, report: dict[str, Any], deadline: float, checks: Checks
) -> Checks:
    """Every step; checks are recorded into `checks` as they pass or fail, so a later error keeps them."""
    timings, facts = report["timings"], report["facts"]
    lap = Stopwatch(timings, log).lap

    env, images = start_daemon_and_build_images(tmp, args, daemon, report, checks, lap)

    workspace = prepare_workspace(tmp, args.source)
    lap("workspace_s")
    stack, values = start_stack(tmp, args, env, workspace, images, report, checks, lap)

    address = args.address
    api_url, mlflow_url, s3_url = f"http://{address}:4200/api", f"http://{address}:5000", f"http://{address}:9000"
    auth = values["PREFECT_AUTH_STRING"]
    host_env = {
        **client_environment(tmp),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_AUTH_STRING": auth,
        "MLFLOW_TRACKING_URI": mlflow_url,
    }
    host_env.update(
        zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), ("admin", values["MLFLOW_ADMIN_PASSWORD"]))
    )
    host_env.pop("DOCKER_HOST", None)
    use_servers_here(host_env)
    unauth = optional(lambda: urllib.request.urlopen(f"{api_url}/flows/filter", data=b"{}", timeout=10).status)
    checks.check("the Prefect API refuses a request without the auth string", lambda: unauth is None)
    run([sys.executable, "-m", "flows.deployments", "--create-pools"], host_env)
    deployed = run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], host_env, check=False)
    detail = next((m for m in re.findall(r"'msg': ('[^']*'|\"[^\"]*\")", deployed.stdout + deployed.stderr)), "")
    checks.check(
        "prefect.yaml deploys as committed (`prefect deploy --all`)",
        lambda: deployed.returncode == 0,
        lambda: detail[:300] or f"exit {deployed.returncode}",
    )
    if deployed.returncode != 0:
        raise RuntimeError("prefect deploy --all failed; nothing to run")
    lap("pools_and_deploy_s")

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    mlflow_client = MlflowClient(tracking_uri=mlflow_url)
    with get_client(sync_client=True) as client:

        def wait_run(flow_run_id: Any, on_poll: Callable[[], None] = lambda: None) -> Any:
            last = None
            while True:
                flow_run = client.read_flow_run(flow_run_id)
                if flow_run.state and flow_run.state.name != last:
                    last = flow_run.state.name
                    log(f"  flow run {flow_run.name}: {last}")
                if flow_run.state and flow_run.state.is_final():
                    if not flow_run.state.is_completed():  # keep its whole Prefect log (tasks included)
                        lines = optional(lambda flow_run=flow_run: flow_run_logs(client, flow_run.id)) or []
                        (tmp / f"flow-{flow_run.name}.log").write_text("\n".join(lines) + "\n")
                        log(f"  its {len(lines)} log lines: {tmp / f'flow-{flow_run.name}.log'}")
                    return flow_run
                if time.monotonic() > deadline:
                    raise E2EFailure(f"flow run {flow_run_id} still {last} at the deadline")
                on_poll()
                time.sleep(2)

        log("run 1: train; kill the gpu worker's container during fine-tuning; the retry resumes")
        deployment = client.read_deployment_by_name(TRAINING)
        killer = FinetuneKiller(stack, env)
        facts["kill_watch"] = killer.how
        killer.start()
        first = client.create_flow_run_from_deployment(deployment.id)
        report["ids"]["first_run"] = str(first.id)
        killed = killer.killed

        def after_kill() -> None:
            """The stage run the worker died in: mark it Crashed, start the worker's container again."""
            if killer.error:
                raise E2EFailure(f"the fine-tune watcher failed: {killer.error}")
            if not killed or "restarted" in killed:
                return
            stage_runs = [r for r in stage_flow_runs(client) if r.state and r.state.is_running()]
            if not stage_runs:
                raise E2EFailure("fine-tuning had started but no stage flow run was running")
            killed["stage_run"] = str(stage_runs[0].id)
            client.set_flow_run_state(stage_runs[0].id, Crashed(message="worker container killed (e2e)"), force=True)
            stack.compose("up", "-d", "--no-build", "--no-deps", "worker-gpu", timeout=300)
            killed["restarted"] = time.monotonic()
            log(f"  stage run {stage_runs[0].name} marked Crashed; worker-gpu started again")

        try:
            first = wait_run(first.id, after_kill)
        finally:
            killer.stop.set()
        lap("first_run_s")
        facts["kill"] = {k: v for k, v in killed.items() if k not in ("at", "restarted")}
        check_first_run(checks, client, mlflow_client, first, stack, killed, report, s3_url, tmp)

        versions_before = len(mlflow_client.search_model_versions(f"name='{report['ids'].get('model')}'"))
        stage_runs_before = len(stage_flow_runs(client))
        log("run 2: the scheduled deployment, nothing changed")
        second = client.create_flow_run_from_deployment(client.read_deployment_by_name(SCHEDULED).id)
        second = wait_run(second.id)
        report["ids"]["second_run"] = str(second.id)
        lap("second_run_s")
        checks.check(
            "second run (training/nightly) completed", lambda: second.state.is_completed(), lambda: second.state.name
        )
        summary = json.loads(stack.exec("worker-cpu", "cat /workspace/reports/run_summary.json", check=True).stdout)
        checks.check(
            "second run skipped every stage",
            lambda: summary["all_skipped"],
            lambda: {s["stage"]: s["ran"] for s in summary["stages"]},
        )
        checks.check(
            "second run sent nothing to the gpu pool", lambda: len(stage_flow_runs(client)) == stage_runs_before
        )
        versions = len(mlflow_client.search_model_versions(f"name='{report['ids'].get('model')}'"))
        checks.check(
            "second run registered no new model version",
            lambda: versions == versions_before,
            lambda: f"{versions} version(s)",
        )
    return checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python infra/scripts/docker_e2e.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--timeout", type=float, default=4500, help="hard limit for the whole run, seconds")
    parser.add_argument("--source", type=Path, default=FLOWERS, help="a folder with daisy/ and sunflowers/")
    parser.add_argument("--address", default="127.77.0.1", help="the loopback address every server listens on")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the e2e_docker report")
    parser.add_argument(
        "--keep",
        action="store_true",
        default=os.environ.get("TP_E2E_KEEP") == "1",
        help="keep the temporary folder (logs, env files); env TP_E2E_KEEP=1",
    )
    parser.add_argument(
        "--base-image",
        default=os.environ.get("TP_E2E_BASE_IMAGE") or None,
        help="an existing base image to use instead of building one; env TP_E2E_BASE_IMAGE",
    )
    parser.add_argument(
        "--keep-images",
        action="store_true",
        default=os.environ.get("TP_E2E_KEEP_IMAGES") == "1",
        help="with a daemon this script did not start: leave the built images (and build cache) "
        "there; env TP_E2E_KEEP_IMAGES=1",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.address.startswith("127."):
        parser.error("--address must be a loopback address (127.0.0.0/8)")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tpe2e-", dir="/tmp"))  # short: the daemon's socket path has a length limit
    daemon = Daemon(tmp)
    report = new_report(tmp, timings={}, facts={}, ids={}, images={})
    checks = Checks()

    def run_it() -> None:
        e2e(tmp, args, daemon, report, started + args.timeout - 240, checks)

    def tear_down(passed: bool) -> None:
        teardown = time.monotonic()
        stack_logs = take_down(tmp, daemon, report, remove_images=not daemon.started and not args.keep_images)
        report["facts"].update(daemon.stop())
        report["timings"]["teardown_s"] = round(time.monotonic() - teardown, 1)
        report["timings"]["total_s"] = round(time.monotonic() - started, 1)
        if not passed:
            print(stack_logs[-20000:], file=sys.stderr)
            (tmp / "compose.log").write_text(stack_logs)  # all of it, kept with the temporary folder
            report["facts"]["logs_kept"] = str(tmp / "compose.log")
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "e2e_docker.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_markdown(report, args.results / "e2e_docker.md")
        if not args.keep and passed:
            shutil.rmtree(tmp, ignore_errors=True)

    if execute(args.timeout, report, checks, run_it, tear_down):
        print(f"docker e2e passed: {len(checks.results)} checks in {report['timings']['total_s']} s")
        return 0
    print_failure("docker e2e", report, checks, f"results: {args.results / 'e2e_docker.md'}; kept: {tmp}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
