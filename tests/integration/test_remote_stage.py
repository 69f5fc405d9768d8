"""A stage run on another worker comes back through the DVC remote without running again here.

The mechanics of `flows.remote_stage.run_stage_remotely` / `stage_flow` on a two-stage toy pipeline,
with plain DVC commands in two clones (no Prefect server): the worker runs the stage and pushes
with `--run-cache` plus `push_uncached_outputs`; the orchestrator's `dvc repro --pull` restores it.
`make e2e-loopback` runs the real thing with servers and workers.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from benchmarks.workspace import dvc, git

DVC_YAML = """\
stages:
  prepare:
    cmd: mkdir -p data && echo pixels > data/images.txt
    outs: [data/images.txt]
  train:
    cmd: >-
      echo ran >> {runs_log} && mkdir -p models reports
      && cat data/images.txt > models/weights.txt && echo epoch,1 > reports/history.csv
    deps: [data/images.txt]
    outs: [models]
    plots:
      - reports/history.csv:
          cache: false
"""


def make_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An orchestrator repository with a local DVC remote, and a worker's clone of it."""
    runs_log = tmp_path / "train_runs.log"
    orchestrator = tmp_path / "orchestrator"
    orchestrator.mkdir()
    git(orchestrator, "init", "-q")
    dvc(orchestrator, "init", "-q")
    (orchestrator / "dvc.yaml").write_text(DVC_YAML.format(runs_log=runs_log))
    dvc(orchestrator, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    git(orchestrator, "add", "-A")
    git(orchestrator, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "pipeline")
    worker = tmp_path / "worker"
    subprocess.run(["git", "clone", "-q", str(orchestrator), str(worker)], check=True, capture_output=True)
    return orchestrator, worker, runs_log


def test_stage_trained_on_a_worker_is_restored_here_not_trained_again(tmp_path: Path) -> None:
    from flows.dvc_workspace import push_uncached_outputs

    orchestrator, worker, runs_log = make_pair(tmp_path)
    # Orchestrator: upstream stage, inputs to the remote (run_stage_remotely before run_deployment).
    dvc(orchestrator, "repro", "--single-item", "prepare")
    dvc(orchestrator, "push", "--with-deps", "--run-cache", "prepare")
    # Worker: stage_flow with the orchestrator's dvc.lock.
    shutil.copy(orchestrator / "dvc.lock", worker / "dvc.lock")
    dvc(worker, "pull", "--with-deps", "prepare")
    dvc(worker, "repro", "--single-item", "train")
    dvc(worker, "push", "--run-cache", "train")
    assert push_uncached_outputs(worker, "train") == 1  # reports/history.csv
    # Orchestrator: the result comes back from the run-cache.
    restored = dvc(orchestrator, "repro", "--pull", "--single-item", "train").stdout

    assert "Stage 'train' is cached - skipping run" in restored, restored
    assert runs_log.read_text().splitlines() == ["ran"]  # trained once, on the worker
    assert (orchestrator / "models" / "weights.txt").read_text() == "pixels\n"
    assert (orchestrator / "reports" / "history.csv").read_text() == (worker / "reports" / "history.csv").read_text()
    assert "up to date" in dvc(orchestrator, "status", "train").stdout
