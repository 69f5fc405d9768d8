"""Process-level safety nets: readable disk errors, atomic outputs that survive a killed writer."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from components.core import errors, files
from components.core.tracking_connection import TrackingUnavailable


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_disk_full_while_writing_an_output_is_one_line_naming_it_and_exit_2(tmp_path, monkeypatch, capsys):
    target = tmp_path / "reports" / "metrics.json"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() on a full disk: no file name

    monkeypatch.setattr(json, "dump", full_disk)

    @errors.cli_errors("evaluate")
    def main() -> int:
        files.write_json(target, {"accuracy": 1.0})
        return 0

    assert main() == 2
    err = capsys.readouterr().err.strip()
    assert err == f"evaluate: error: cannot write {target}: no space left on device (free some space, then rerun)"
    assert list(target.parent.iterdir()) == []  # no temp file left behind, no partial metrics.json


def test_error_inside_an_output_folder_names_the_output_not_the_temp_folder(tmp_path):
    target = tmp_path / "models" / "head"
    with pytest.raises(OSError) as caught, files.atomic_dir(target) as tmp:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp / "model.keras"))
    assert caught.value.errno == errno.EROFS
    assert caught.value.filename == str(target / "model.keras")
    assert errors.describe_os_error(caught.value) == (
        f"cannot write {target / 'model.keras'}: read-only file system (choose a writable location)"
    )


def test_output_path_under_a_regular_file_is_explained(tmp_path, capsys):
    blocker = tmp_path / "reports"
    blocker.write_text("not a folder")

    @errors.cli_errors("ingest")
    def main() -> int:
        files.write_json(blocker / "sub" / "ingest.json", {})
        return 0

    assert main() == 2
    assert capsys.readouterr().err.strip() == (
        f"ingest: error: cannot access {blocker / 'sub'}: a parent of this path is a file, not a folder"
    )


def test_unrelated_errors_still_raise(tmp_path):
    @errors.cli_errors("validate")
    def main() -> int:
        raise KeyError("a bug, not a disk problem")

    with pytest.raises(KeyError):
        main()


def test_unreachable_service_exits_1_with_its_message(capsys):
    @errors.cli_errors("finetune")
    def main() -> int:
        raise TrackingUnavailable("MLflow at http://***@127.0.0.1:5 failed to reach the tracking server")

    assert main() == 1
    assert capsys.readouterr().err.strip().startswith("finetune: error: MLflow at http://***@127.0.0.1:5 failed")


def test_leftovers_of_a_killed_writer_are_swept_and_its_previous_output_restored(tmp_path):
    target = tmp_path / "raw"
    host = files._owner().rpartition(".")[0]
    dead = f"{host}.{_dead_pid()}"
    half_written = tmp_path / f".raw.tmp-{dead}-abc123"
    (half_written / "cls").mkdir(parents=True)
    (half_written / "cls" / "partial.jpg").write_bytes(b"\xff\xd8")
    previous = tmp_path / f".raw.old-{dead}"  # killed between its two renames: the complete old output
    previous.mkdir()
    (previous / "complete.txt").write_text("v1")
    alive = tmp_path / f".raw.tmp-{files._owner()}-zzz999"  # a writer still running (this process)
    alive.mkdir()

    files.sweep_leftovers(target)

    assert (target / "complete.txt").read_text() == "v1"
    assert not half_written.exists() and not previous.exists()
    assert alive.exists()


def test_a_new_write_replaces_the_output_and_leaves_no_temp_siblings(tmp_path):
    target = tmp_path / "out"
    for version in ("v1", "v2"):
        with files.atomic_dir(target) as tmp:
            (tmp / "data.txt").write_text(version)
    assert (target / "data.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cores_are_the_ones_this_process_may_use_wherever_workers_are_counted(monkeypatch):
    from components import ingest
    from components.core import runtime
    from components.modeling import data

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5}, raising=False)  # what a container allows
    assert runtime.available_cores() == 2
    assert (data.default_workers(), ingest.resolve_workers(0), ingest.resolve_workers(3)) == (2, 2, 3)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # no affinity call (macOS, Windows)
    assert runtime.available_cores() == 64 and data.default_workers() == 4


def test_unreachable_tracking_server_fails_within_seconds_naming_it_without_credentials(monkeypatch):
    import socket
    import time

    from components.core.config import TrackingConfig
    from components.core.tracking_connection import RetryPolicy, setup_mlflow, with_retries

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:hunter2-token@127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as caught:
        with_retries(
            "reach the tracking server",
            setup_mlflow,
            TrackingConfig(),
            policy=RetryPolicy(attempts=2, first_wait_s=0.1),
        )
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert f"http://***@127.0.0.1:{port}" in message and "after 2 attempts" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("stage", ["ingest", "validate", "augment"])
def test_the_data_stages_start_without_tensorflow_keras_or_mlflow(stage: str) -> None:
    """Their processes start in a second or two: a module-level import of TensorFlow there costs ~5 s a run."""
    heavy = "('tensorflow', 'keras', 'mlflow')"
    probe = f"import sys, components.{stage}; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# A stage's last moments once a framework is loaded: a worker thread still finishing an upload, an atexit
# handler, and output still in the stdout buffer. None of it may be lost by skipping the module teardown.
EXIT_SCRIPT = """
import atexit, os, sys, threading, time, types
from pathlib import Path
from components.core import runtime
out = Path(sys.argv[1])
real_exit = os._exit
os._exit = lambda code: ((out / "fast.txt").write_text("skipped teardown"), real_exit(code))
if sys.argv[2] == "heavy":
    sys.modules["torch"] = types.ModuleType("torch")  # stands in for a loaded framework
def upload():
    time.sleep(0.5)
    (out / "thread.txt").write_text("done")
threading.Thread(target=upload).start()
from concurrent.futures import ThreadPoolExecutor  # its idle workers end only through threading's exit hook
pool = ThreadPoolExecutor(2)  # kept alive, as a library keeps its pool
pool.submit(lambda: (out / "pool.txt").write_text("done"))
atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
sys.stdout.write("last line, unflushed")
runtime.exit_process(3)
"""


@pytest.mark.parametrize("frameworks", ["heavy", "none"])
def test_a_stage_exit_keeps_its_exit_code_threads_atexit_handlers_and_buffered_output(frameworks, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path), frameworks], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "last line, unflushed"
    assert (tmp_path / "thread.txt").read_text() == (tmp_path / "pool.txt").read_text() == "done"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "fast.txt").exists() == (frameworks == "heavy")  # plain stages exit the usual way


def test_every_stage_program_ends_through_the_fast_exit() -> None:
    from pathlib import Path

    components = Path(__file__).resolve().parents[2] / "components"
    programs = [p for p in components.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()]
    assert len(programs) >= 10
    for program in programs:
        assert program.read_text().rstrip().endswith("runtime.exit_process(main())"), program
