"""The loopback e2e's own processes: servers and workers in process groups of their own, and PostgreSQL.

`Services` starts each long-running process with its log and stops them all (every descendant too) on the
way out; `start_postgres` makes a private PostgreSQL cluster on 127.0.0.1 for the Prefect and MLflow servers
when one is installed here (loopback_e2e.py falls back to SQLite otherwise).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from e2e_harness import REPO, E2EFailure, stop_all

SERVER_START_TIMEOUT_S = 240
LOG_TAIL_LINES = 60


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
        stop_all(stop_all(targets, "terminate", 20), "kill", 10)
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
