"""Process-level set-up shared by every stage: telemetry off, quiet logs, seeds, atomic outputs.

Imported first by each stage's CLI so that nothing phones home on an offline machine.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Outbound calls the libraries make unless told not to (a silent network could hang a run).
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "DVC_NO_ANALYTICS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def quiet_environment() -> None:
    """Switch off telemetry and update checks; explicit settings in the environment win."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


quiet_environment()


def configure_tensorflow(seed: int) -> dict[str, Any]:
    """Seed everything and describe the devices; mixed precision only where a GPU is present."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised
            tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return {"gpus": len(gpus), "mixed_precision": bool(gpus), "jit_compile": bool(gpus)}


def jit_compile_default() -> bool:
    """XLA helps on GPUs and is ~7x slower on small CPUs, so only use it with a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


# --- atomic outputs -----------------------------------------------------------------------------

def _owner() -> str:
    """host.pid of this process: temp names carry it so a later run can tell a dead writer's leftovers."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
    return f"{host}.{os.getpid()}"


def _writer_is_dead(owner: str) -> bool:
    host, _, pid = owner.rpartition(".")
    if host != _owner().rpartition(".")[0] or not pid.isdigit():
        return False  # another machine's (shared disk) or not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_leftovers(target: Path) -> None:
    """Remove temp siblings of `target` left by writers that were killed (SIGKILL, power loss).

    A writer killed between its two renames leaves only `.<name>.old-*`: that is the previous
    complete output, so it is put back rather than deleted.
    """
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(.+\.\d+)(-[A-Za-z0-9_]+)?$")
    if not target.parent.is_dir():
        return
    for sibling in target.parent.iterdir():
        found = pattern.match(sibling.name)
        if not found or not _writer_is_dead(found.group(2)):
            continue
        if found.group(1) == "old" and not target.exists():
            sibling.rename(target)
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _name_the_target(exc: OSError, tmp: Path, target: Path) -> OSError:
    """The same error, naming the output the user asked for instead of our temp path."""
    def shown(name: Any) -> str | None:
        name = os.fsdecode(name) if name is not None else None
        return str(target) + name[len(str(tmp)):] if name is not None and name.startswith(str(tmp)) else name

    first, second = shown(exc.filename), shown(exc.filename2)
    if exc.errno is None or (first, second) == (exc.filename, exc.filename2) and first is not None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), first or str(target), None, second)


def ensure_writable(*targets: str | Path) -> None:
    """Fail before long work, not after it, when an output's folder cannot be made or written
    (read-only file system, a file where a folder should be, no permission)."""
    for target in map(Path, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.probe-", dir=target.parent)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        os.close(fd)
        os.unlink(probe)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `target` only if the block succeeds.

    A killed process leaves the old output (or none), never a half-written one; the next write
    sweeps what it left behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner()}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{_owner()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as exc:
        shown = _name_the_target(exc, tmp, target)
        if shown is exc:
            raise
        raise shown from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `target` that is renamed over it when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{_owner()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        tmp.replace(target)
    except OSError as exc:
        shown = _name_the_target(exc, tmp, target)
        if shown is exc:
            raise
        raise shown from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --- command-line errors -------------------------------------------------------------------------

class Unavailable(RuntimeError):
    """An outside service (the MLflow server, remote storage) stayed unreachable after retries.

    Nothing was lost: the stage can simply be rerun once the service answers.
    """


# Why an output could not be written, in words a user can act on (errno -> reason).
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on device (free some space, then rerun)",
    errno.EDQUOT: "disk quota exceeded (free some space or raise the quota, then rerun)",
    errno.EROFS: "read-only file system (choose a writable location)",
    errno.EFBIG: "file too large for this file system",
}
ACCESS_FAILURES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent of this path is a file, not a folder",
    errno.EISDIR: "this path is a folder, a file was expected",
}


def describe_os_error(exc: BaseException) -> str | None:
    """'cannot write <path>: <reason>' for disk-full/unwritable errors (also when wrapped), else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in WRITE_FAILURES | ACCESS_FAILURES:
            # A copy or rename names its source first; the destination is what could not be written.
            path = exc.filename2 if exc.errno in WRITE_FAILURES and exc.filename2 is not None else exc.filename
            where = os.fsdecode(path) if path is not None else "an output (the system did not say which)"
            verb = "write" if exc.errno in WRITE_FAILURES else "access"
            return f"cannot {verb} {where}: {(WRITE_FAILURES | ACCESS_FAILURES)[exc.errno]}"
        if isinstance(exc, FileExistsError) and exc.filename is not None and Path(os.fsdecode(exc.filename)).is_file():
            return f"cannot write under {os.fsdecode(exc.filename)}: it is a file, and a folder is needed there"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def cli_errors(stage: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a stage's `main`: disk full, unwritable paths and unreachable services end the
    process with one readable line (exit 2, or 1 for a service that may come back), not a traceback.
    Outputs are written atomically, so the previous complete outputs are still in place.
    """
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except Unavailable as exc:
                print(f"{stage}: error: {exc}", file=sys.stderr)
                return 1
            except Exception as exc:
                message = describe_os_error(exc)
                if message is None:
                    raise
                print(f"{stage}: error: {message}", file=sys.stderr)
                return 2
        return guarded
    return decorate
