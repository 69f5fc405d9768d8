"""Outputs that are whole or absent: atomic folders and files, JSON, CSV, and the leftovers of killed writers.

Every CSV we write goes through `write_csv`: a text cell that a spreadsheet would run as a formula
(leading `=`, `+`, `-`, `@`, tab or CR: labels and file names are untrusted) gets a leading `'`
(OWASP's advice), and `read_csv` takes it off again, so what is read back is what was written.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# A cell that starts with these, after any quotes we added, would be a formula in a spreadsheet.
_FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


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
        return str(target) + name[len(str(tmp)) :] if name is not None and name.startswith(str(tmp)) else name

    first, second = shown(exc.filename), shown(exc.filename2)
    if exc.errno is None or (first, second) == (exc.filename, exc.filename2) and first is not None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), first or str(target), None, second)


def _temp_prefix(target: Path) -> str:
    """Make `target`'s folder and sweep dead writers' leftovers there; the name prefix of this writer's temp sibling."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(target)
    return f".{target.name}.tmp-{_owner()}-"


@contextlib.contextmanager
def _errors_name(target: Path, tmp: Path) -> Iterator[None]:
    """An OSError raised inside the block names the output the user asked for, not the temp sibling `tmp`."""
    try:
        yield
    except OSError as exc:
        shown = _name_the_target(exc, tmp, target)
        if shown is exc:
            raise
        raise shown from exc


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
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        with _errors_name(target, tmp):
            yield tmp
            if target.exists():
                old = target.with_name(f".{target.name}.old-{_owner()}")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `target` that is renamed over it when the block succeeds."""
    target = Path(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _errors_name(target, tmp):
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
                yield fh
            tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def neutralise_formula(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with `'`; anything else as it is.

    Cells that already start with quotes before a formula character get one more, so `restore_formula`
    is its exact inverse.
    """
    return "'" + value if isinstance(value, str) and _FORMULA_START.match(value) else value


def restore_formula(value: Any) -> Any:
    """The cell `neutralise_formula` was given."""
    if isinstance(value, str) and value.startswith("'") and _FORMULA_START.match(value, 1):
        return value[1:]
    return value


CSV_CHUNK_ROWS = 4096  # rows parsed, restored or neutralised at once (issue 24): the parser and the per-cell
# formula guard make a Python object of every text cell, about 1 KB per row when a table went through at once


def write_csv(frame: pd.DataFrame, path: str | Path, **to_csv: Any) -> Path:
    """`frame` as CSV (no index, `\\n` line ends), atomically, every text cell neutralised; CSV_CHUNK_ROWS at a time."""
    options = {"index": False, "lineterminator": "\n", **to_csv}
    header = options.pop("header", True)
    with atomic_file(path) as fh:
        for start in range(0, max(len(frame), 1), CSV_CHUNK_ROWS):
            safe = frame.iloc[start : start + CSV_CHUNK_ROWS].copy()
            for column in safe.columns:
                if not _numeric(safe[column]):
                    safe[column] = safe[column].map(neutralise_formula)
            safe.to_csv(fh, header=header if start == 0 else False, **options)
    return Path(path)


def write_csv_rows(header: Sequence[str], rows: Iterable[Sequence[Any]], path: str | Path) -> Path:
    """The bytes `write_csv` writes for a frame of these rows, one row at a time (no frame: issue 24).

    pandas writes through the csv module with these settings; numbers are never neutralised, text always.
    """
    with atomic_file(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([neutralise_formula(cell) for cell in row] for row in rows)
    return Path(path)


def read_csv(path: str | Path, **read_csv_kwargs: Any) -> pd.DataFrame:
    """A CSV written by `write_csv`, with the cells as they were before neutralising.

    Parsed CSV_CHUNK_ROWS at a time; when the chunks' column types differ (e.g. a number column with a blank
    cell in one chunk only), the file is parsed at once instead, so the types are always pandas' for the whole.
    """
    import pandas as pd

    with pd.read_csv(path, chunksize=CSV_CHUNK_ROWS, **read_csv_kwargs) as reader:
        chunks = list(reader)
    if len({tuple(chunk.dtypes) for chunk in chunks}) != 1:  # also a header without rows: no chunk at all
        chunks = [pd.read_csv(path, **read_csv_kwargs)]
    for chunk in chunks:
        for column in chunk.columns:
            if not _numeric(chunk[column]):
                chunk[column] = chunk[column].map(restore_formula)
    return chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)


def _numeric(column: pd.Series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)
