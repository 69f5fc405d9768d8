"""The training flow: the six stages of dvc.yaml as Prefect tasks, in one workspace.

Each task runs `dvc repro --single-item <stage>`, so the flow and a plain `dvc repro` share one
cache and one dvc.lock: a stage whose inputs did not change is skipped by either runner. The flow
adds what DVC lacks: fail-fast settings checks, one run per workspace, retries for the stages that
can fail transiently, Prefect logs, and a markdown summary artifact.

    python -m flows.training                              # the pipeline on params.yaml
    python -m flows.training --set ingest.source=DIR      # set a param (written to params.yaml), then run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from components import runtime  # noqa: F401  (telemetry off before Prefect/MLflow load)

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from filelock import FileLock, Timeout  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from components.config import ParamsError, load_params, write_overrides  # noqa: E402
from flows import summary  # noqa: E402

STAGES = ("ingest", "validate", "augment", "train_head", "finetune", "evaluate")
# Downloads and registry calls can fail transiently; validation failures are the data's, not the network's.
STAGE_RETRIES = {"ingest": 2, "validate": 0, "augment": 1, "train_head": 1, "finetune": 1, "evaluate": 2}
LOCK_FILE = Path(".tp") / "training.lock"


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message carries the end of its output."""


def _stage_env() -> dict[str, str]:
    """Environment for stage processes: this interpreter's tools first, flow run id for lineage."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run_id = flow_run.get_id()
    if run_id:
        env["TP_PREFECT_FLOW_RUN_ID"] = str(run_id)
    return env


def run_dvc(args: list[str], workdir: Path, logger: Any) -> tuple[int, list[str]]:
    """Run a DVC command, streaming its output to the logger; return exit code and lines."""
    dvc = Path(sys.executable).parent / "dvc"
    cmd = [str(dvc) if dvc.exists() else "dvc", *args]
    proc = subprocess.Popen(cmd, cwd=workdir, env=_stage_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            logger.info(line)
    return proc.wait(), lines


def _stage_task(stage: str):
    @task(name=f"stage:{stage}", retries=STAGE_RETRIES[stage], retry_delay_seconds=[10, 60][: STAGE_RETRIES[stage]] or 0)
    def run(workdir: str) -> dict[str, Any]:
        logger = get_run_logger()
        started = time.monotonic()
        code, lines = run_dvc(["repro", "--single-item", stage], Path(workdir), logger)
        if code != 0:
            tail = "\n".join(lines[-25:])
            raise StageFailed(f"stage '{stage}' failed (dvc exit {code}):\n{tail}")
        skipped = any(f"Stage '{stage}' didn't change, skipping" in line for line in lines)
        return {"stage": stage, "ran": not skipped, "seconds": round(time.monotonic() - started, 1)}

    return run


STAGE_TASKS = {stage: _stage_task(stage) for stage in STAGES}


@flow(name="training", log_prints=True)
def training_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, workdir: str = ".") -> dict[str, Any]:
    """Ingest -> validate -> augment -> train_head -> finetune -> evaluate, skipping unchanged stages."""
    logger = get_run_logger()
    root = Path(workdir).resolve()
    params_file = root / params_path
    # Fail fast: every setting is checked before any stage does work.
    params = write_overrides(params_file, overrides) if overrides else load_params(params_file)
    if overrides:
        logger.info("params.yaml updated: %s", ", ".join(overrides))
    lock = FileLock(str(root / LOCK_FILE), timeout=0)
    (root / LOCK_FILE).parent.mkdir(exist_ok=True)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(
            f"another training run is using the workspace {root} (lock {LOCK_FILE}); "
            "this run exits without touching DVC or MLflow state. Retry when it has finished."
        ) from None
    try:
        outcomes = [STAGE_TASKS[stage](str(root)) for stage in STAGES]
    finally:
        lock.release()
    result = summary.collect(root, params, outcomes)
    markdown = summary.write(root, result)
    create_markdown_artifact(key="training-summary", markdown=markdown,
                             description="Data, validation, metrics and registry decision of this run")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="settings file, relative to --workdir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a param before running (validated, written to the params file)")
    parser.add_argument("--workdir", default=".", help="the DVC workspace (a git repository)")
    args = parser.parse_args(argv)
    try:
        result = training_flow(params_path=args.params, overrides=args.overrides or None, workdir=args.workdir)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
