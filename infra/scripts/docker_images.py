"""The Docker side of `make e2e-docker`: a daemon (DOCKER_HOST's, or a private one started here) and the images.

The base image is built with debootstrap (or given), the images of infra/ from their lock files with pip
reading a wheelhouse that the host's pip downloaded (served on 127.0.0.1 to `docker build`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e_harness import REPO, Checks, E2EFailure, run, stop_all

from benchmarks.workspace import git

INFRA = REPO / "infra"
PROJECT = "tp-e2e"  # the compose project: its containers, volumes and networks carry this label
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


def start_daemon_and_build_images(
    tmp: Path,
    args: argparse.Namespace,
    daemon: Daemon,
    report: dict[str, Any],
    checks: Checks,
    lap: Callable[[str], None],
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The daemon, a check that nothing of the stack is left on it, then the images: the daemon's environment
    and each image's size and user (also in the report)."""
    timings, facts = report["timings"], report["facts"]
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
    return env, images
