"""The sweep flow: a small grid (or list) of settings, run as queued DVC experiments, compared.

Each point is `dvc exp run --queue -S key=value ...`; `dvc queue start -j JOBS` runs them with
bounded concurrency in DVC's temporary folders, sharing the workspace's DVC cache (an unchanged
train_head is restored from the run-cache, not retrained), feature cache and MLflow store. Past the
wall-time budget the running points are stopped and the queued ones dropped. The comparison table
and a plot of accuracy against training time go to reports/sweep/ and to an MLflow run.

    python -m flows.sweep --grid '{"finetune.learning_rate": [1e-4, 2e-4], "finetune.unfreeze_layers": [60, 100]}'
    python -m flows.sweep --apply lr-sweep-3        # make a point's settings (and outputs) the workspace's

The CLI is trusted; the deployment runs `sweep_deployment`, whose run form is confined by the
workspace's `deployments:` settings first (components/lifecycle/run_forms.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.core.config import ParamsError, load_params
from components.core.paths import SWEEP_REPORTS
from components.lifecycle import run_forms, sweeps
from flows.commands import run_command
from flows.dvc_workspace import LOCK_FILE
from flows.limits import StageFailed, workspace_slot

POLL_S = 10.0


def _queue_states(root: Path) -> dict[str, str]:
    """Experiment name -> Queued | Running | Success | Failed, from DVC's queue (its Python API)."""
    # DVC internals on purpose: dvc.api has no queue status, and `dvc queue status` prints a table, no JSON.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {entry["name"]: entry["status"] for entry in repo.experiments.celery_queue.status() if entry["name"]}


@task(name="queue-points")
def queue_points(workdir: str, name: str, points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    logger = get_run_logger()
    names = {}
    for i, point in enumerate(points, start=1):
        exp = f"{name}-{i}"
        args = ["dvc", "exp", "run", "--queue", "-n", exp]
        for change in sweeps.point_overrides(point):
            args += ["-S", change]
        done = run_command(args, workdir, logger)
        if done.code != 0:
            raise StageFailed(f"queueing {exp} failed:\n" + done.tail(10), retryable=False)
        names[exp] = point
    return names


@task(name="run-queue")
def run_queue(workdir: str, names: list[str], jobs: int, budget_s: float) -> dict[str, str]:
    """Start the queue's workers and wait for the points, within the wall-time budget."""
    logger = get_run_logger()
    root = Path(workdir)
    done = run_command(["dvc", "queue", "start", "-j", str(jobs)], root, logger)
    if done.code != 0:
        raise StageFailed("dvc queue start failed:\n" + done.tail(10), retryable=False)
    started, seen = time.monotonic(), {}
    while True:
        states = {n: s for n, s in _queue_states(root).items() if n in names}
        if states != seen:
            logger.info("sweep: %s", ", ".join(f"{n} {s.lower()}" for n, s in sorted(states.items())))
            seen = states
        if all(s in ("Success", "Failed") for s in states.values()) and len(states) == len(names):
            return states
        if time.monotonic() - started > budget_s:
            logger.warning("sweep: wall-time budget of %.0f s reached: stopping the rest", budget_s)
            running = [n for n, s in states.items() if s == "Running"]
            if running:
                run_command(["dvc", "queue", "kill", *running], root, logger)
            run_command(["dvc", "queue", "remove", "--queued"], root, logger)
            return {n: states.get(n, "Queued") for n in names}
        time.sleep(POLL_S)


@task(name="sweep-report")
def report(workdir: str, name: str, names: dict[str, dict[str, Any]], tracking: dict[str, Any]) -> dict[str, Any]:
    root = Path(workdir)
    done = run_command(["dvc", "exp", "show", "--json"], root)
    if done.code != 0:
        raise StageFailed("dvc exp show failed:\n" + done.tail(10))
    table = sweeps.results_table(json.loads("".join(done.lines)), names)
    paths = sweeps.write_reports(table, root / SWEEP_REPORTS, name)
    _log_to_mlflow(root, name, paths, tracking)
    best = sweeps.best_point(table)
    return {
        "table": table.to_dict(orient="records"),
        "reports": {k: str(v) for k, v in paths.items()},
        "best": None if best is None else best["experiment"],
    }


def _log_to_mlflow(root: Path, name: str, paths: dict[str, Path], tracking: dict[str, Any]) -> None:
    from components.core.config import TrackingConfig
    from components.core.pipeline_runs import start_pipeline_run
    from components.core.tracking import log_picture

    client, run_id = start_pipeline_run(TrackingConfig(**tracking), f"sweep {name}", {"sweep": name}, workspace=root)
    client.log_artifact(run_id, str(paths["csv"]), "sweep")
    client.log_artifact(run_id, str(paths["md"]), "sweep")
    log_picture(client, run_id, paths["png"], "sweep/accuracy_vs_time.png")
    client.set_terminated(run_id, "FINISHED")


@flow(name="sweep", log_prints=True, validate_parameters=True)
def sweep_flow(
    grid: dict[str, list[Any]] | None = None,
    points: list[dict[str, Any]] | None = None,
    name: str = "sweep",
    jobs: int = 1,
    budget_minutes: float = 120.0,
    workdir: str = ".",
    params_path: str = "params.yaml",
) -> dict[str, Any]:
    """Run every point of `grid` (param -> values) or `points` as a queued DVC experiment and compare them."""
    root = Path(workdir).resolve()
    params_file = root / params_path
    params = load_params(params_file)
    chosen = sweeps.grid_points(grid, points)
    sweeps.check_points(params_file, chosen)  # every point valid before anything is queued
    # The same slot as training (Prefect's concurrency limit, the workspace lock): one user of the workspace.
    # The sweep's own bound is its budget.
    with workspace_slot(root, LOCK_FILE, params.orchestration, get_run_logger()):
        names = queue_points(str(root), name, chosen)
        states = run_queue(str(root), list(names), jobs, budget_minutes * 60)
        result = report(str(root), name, names, params.tracking.model_dump())
    result["states"] = states
    markdown = (root / result["reports"]["md"]).read_text(encoding="utf-8")
    create_markdown_artifact(
        key=f"sweep-{name}".lower().replace("_", "-"),
        markdown=markdown,
        description="Sweep points: settings, validation and test metrics, training time",
    )
    return result


@flow(name="sweep", log_prints=True, validate_parameters=True)
def sweep_deployment(
    grid: dict[str, list[Any]] | None = None,
    points: list[dict[str, Any]] | None = None,
    name: str = "sweep",
    jobs: int = 1,
    budget_minutes: float = 120.0,
    workdir: str = ".",
    params_path: str = "params.yaml",
) -> dict[str, Any]:
    """The sweep for deployments (prefect.yaml): the run form is checked first.

    Every point's keys must be in the workspace's `deployments.override_keys` (never a limit), the name
    is a plain name (it names experiments and report files), jobs and budget are bounded, and the
    workspace is the worker's own; anything else is refused before anything is queued.
    """
    changes = [c for point in sweeps.grid_points(grid, points) for c in sweeps.point_overrides(point)]
    run_forms.check_sweep_form(changes, name, jobs, budget_minutes, workdir, params_path)
    return sweep_flow.fn(grid, points, name, jobs, budget_minutes, workdir, params_path)


def apply_point(workdir: str, experiment: str) -> None:
    """Make one experiment's settings and outputs the workspace's (`dvc exp apply`)."""
    done = run_command(["dvc", "exp", "apply", experiment], workdir)
    if done.code != 0:
        raise RuntimeError(f"dvc exp apply {experiment} failed:\n" + done.tail(10))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tp-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=json.loads, help="JSON object: param -> list of values")
    parser.add_argument("--points", type=json.loads, help="JSON list of {param: value} points")
    parser.add_argument("--name", default="sweep", help="the sweep's name: experiments are NAME-1, NAME-2, ...")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (1 on a small CPU)")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=120.0,
        help="wall time after which running points stop and queued ones are dropped",
    )
    parser.add_argument("--workdir", default=".", help="the DVC workspace (a git repository)")
    parser.add_argument("--apply", metavar="EXPERIMENT", help="apply one point to the workspace and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.apply:
        apply_point(args.workdir, args.apply)
        print(f"applied {args.apply}: params.yaml and outputs are now that experiment's (commit them to keep them)")
        return 0
    try:
        result = sweep_flow(
            grid=args.grid,
            points=args.points,
            name=args.name,
            jobs=args.jobs,
            budget_minutes=args.budget_minutes,
            workdir=args.workdir,
        )
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(Path(args.workdir, result["reports"]["md"]).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
