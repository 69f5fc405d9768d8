"""Errors a user can act on: unreachable services, disk and permission faults, one line per CLI failure."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def printable(text: str, keep: str = "") -> str:
    """`text` safe for a terminal or a log line: every character a terminal acts on or hides (control
    characters and ANSI escapes, newlines, format and separator characters) is written as its escape
    (`\\x1b`, `\\n`, `\\u200b`). `keep` names characters left as they are (a message's own newlines)."""
    return "".join(ch if ch.isprintable() or ch in keep else ch.encode("unicode_escape").decode("ascii") for ch in text)


# Exit codes of every stage CLI: the flow retries only what may pass on a second try.
EXIT_USER_ERROR = 2  # settings, data, disk or permissions: the same input fails the same way
EXIT_UNAVAILABLE = 1  # a service (MLflow, storage) did not answer: worth retrying later
STATUS_DIR_VARIABLE = "TP_STATUS_DIR"  # where a stage leaves <stage>.json saying how it ended


def record_outcome(stage: str, exit_code: int, kind: str) -> None:
    """Leave `{stage, exit_code, kind}` for the orchestrator (which cannot see through `dvc repro`'s exit code)."""
    folder = os.environ.get(STATUS_DIR_VARIABLE)
    if not folder:
        return
    path = Path(folder) / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stage": stage, "exit_code": exit_code, "kind": kind}), encoding="utf-8")


def cli_errors(stage: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a stage's `main`: disk full, unwritable paths and unreachable services end the
    process with one readable line (exit 2, or 1 for a service that may come back), not a traceback.
    Outputs are written atomically, so the previous complete outputs are still in place. How the
    stage ended is recorded for the flow's retry decision (`record_outcome`).
    """

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args: Any, **kwargs: Any) -> int:
            try:
                code = main(*args, **kwargs)
            except Unavailable as exc:
                print(f"{stage}: error: {printable(str(exc), keep=chr(10))}", file=sys.stderr)
                record_outcome(stage, EXIT_UNAVAILABLE, "unavailable")
                return EXIT_UNAVAILABLE
            except Exception as exc:
                message = describe_os_error(exc)
                if message is None:
                    record_outcome(stage, 1, "crash")
                    raise
                print(f"{stage}: error: {printable(message)}", file=sys.stderr)
                record_outcome(stage, EXIT_USER_ERROR, "user")
                return EXIT_USER_ERROR
            record_outcome(stage, code, "ok" if code == 0 else "user" if code == EXIT_USER_ERROR else "failed")
            return code

        return guarded

    return decorate
