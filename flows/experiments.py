"""A training run with changed settings (`--set`), as a DVC experiment in a temporary copy of the workspace.

`dvc exp run --temp` runs the pipeline in DVC's copy, so a run killed at any point (SIGKILL, OOM) leaves the
workspace's params.yaml, dvc.lock and outputs as they were; the results are read back from the experiment
(`dvc exp show`, `dvc exp apply NAME`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import update_progress_artifact
from prefect.runtime import flow_run

from components.core.config import load_params
from components.core.contracts import PromotionRecord
from components.core.overrides import write_overrides
from components.core.settings import environment
from flows import summary
from flows.dvc_workspace import STAGES, changed_stages, needs_preflight, run_experiment_in_copy, stages_reading
from flows.limits import StageFailed
from flows.run_records import finish_pipeline_run, pipeline_run, promoted_by_this_run, start_progress
from flows.stage_tasks import preflight, push_to_remote, step_task


def experiment_name() -> str:
    """A readable, unique experiment name: the Prefect flow run's own name when there is one."""
    return f"flow-{flow_run.get_name() or time.strftime('%Y%m%d-%H%M%S')}"


def experiment_outcomes(lines: list[str]) -> list[dict[str, Any]]:
    """Per stage, whether `dvc exp run` reproduced it (ran, or restored from the run-cache) or skipped it."""
    text = "\n".join(lines)
    return [
        {
            "stage": stage,
            "ran": f"Running stage '{stage}'" in text or f"Stage '{stage}' is cached" in text,
            "seconds": 0.0,
            "where": "experiment (temporary copy)",
        }
        for stage in STAGES
    ]


@task(name="dvc-experiment")
def run_experiment(workdir: str, name: str, changes: list[str], timeout_s: float | None = None) -> list[dict[str, Any]]:
    """`dvc exp run --temp -n NAME -S ...`: the whole pipeline in DVC's temporary copy, saved as an experiment."""
    done = run_experiment_in_copy(Path(workdir), name, changes, get_run_logger(), timeout_s)
    if done.code != 0:
        raise StageFailed(f"experiment {name} failed:\n" + done.tail(25), retryable=False)
    return experiment_outcomes(done.lines)


def run_as_experiment(root: Path, params_file: Path, changes: list[str], name: str, logger: Any) -> dict[str, Any]:
    """`changes` as a DVC experiment in a temporary copy of the workspace (`dvc exp run --temp`).

    The workspace's params.yaml, dvc.lock and outputs are never written, so no crash can leave an
    experiment's settings behind. The experiment's results are read back from DVC (`dvc exp show`).
    """
    params = load_params(params_file, changes)
    limits = params.orchestration
    step = limits.step_timeout_s
    logger.info("experiment %s: %s (run in a temporary copy; params.yaml is not written)", name, ", ".join(changes))
    if environment().gpu_deployment:
        logger.info("experiments run here, in DVC's temporary copy: no stage goes to %s", environment().gpu_deployment)
    changed = changed_stages(root) | stages_reading(root, [change.split("=", 1)[0] for change in changes])
    if needs_preflight(changed):
        with tempfile.TemporaryDirectory(prefix="tp-experiment-") as scratch:
            # Preflight reads a settings file: a scratch copy with the changes, outside the workspace.
            merged = Path(scratch) / "params.yaml"
            merged.write_bytes(params_file.read_bytes())
            write_overrides(merged, changes)
            step_task(preflight, limits)(str(root), str(merged), step)
    with pipeline_run(params, root, name) as parent:  # the experiment's stage processes nest under it
        # One task runs every stage in DVC's copy: its timeout is theirs together.
        pipeline_s = sum(limits.stage_timeout_s.model_dump().values())
        progress = start_progress(f"DVC experiment {name} running")
        outcomes = run_experiment.with_options(timeout_seconds=pipeline_s)(str(root), name, changes, pipeline_s)
    update_progress_artifact(progress, 100.0, f"DVC experiment {name} done")
    finish_pipeline_run(params, root, parent, outcomes)
    result = summary.collect_experiment(root, params, outcomes, name)
    promotion = PromotionRecord.model_validate(result["promotion"]) if result.get("promotion") else None
    promoted_now = promoted_by_this_run(promotion)
    if promoted_now:
        logger.warning(
            "experiment %s promoted its model; its folder is in the experiment, so it is not exported here: "
            "`dvc exp apply %s`, then `python -m components.export`",
            name,
            name,
        )
    pushed = step_task(push_to_remote, limits)(str(root), step)
    return summary.run_result(result, parent, pushed, promoted_now, experiment=name)
