"""Soak: the training flow several times in a row in one process, on a small real subset.

    python -m benchmarks.soak --runs 5          (make soak)

Run 1 trains everything; each later run changes `finetune.learning_rate`, so it fine-tunes, evaluates
and registers again; the last run changes nothing and must skip every stage. After each run it
records the flow process's memory and open files, `dvc status`, and the registry's version count.
Fails (exit 1) when a run does not complete, DVC is not clean, the registry does not hold one version
per run that trained, or memory / open files keep growing. Results: benchmarks/results/soak.json, .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.workspace import REPO, dvc, make_workspace

RESULTS = REPO / "benchmarks" / "results"
SMALL = {
    "model": {"alpha": 0.35, "image_size": 112},  # no weights file of its own: the 224 one serves
    "ingest": {"split": {"train": 0.7, "val": 0.15, "test": 0.15}},
    "validate": {"min_images_per_class": 5},
    "train_head": {"epochs": 5, "augmented_copies": 1},
    "finetune": {"epochs": 1, "unfreeze_layers": 20, "warmup_epochs": 0},
}


def process_figures() -> dict[str, float]:
    import psutil

    proc = psutil.Process()
    return {
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "open_files": len(proc.open_files()),
        "fds": proc.num_fds(),
    }


def registry_versions(workspace: Path, name: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    return len(client.search_model_versions(f"name='{name}'"))


def grows_steadily(values: list[float], tolerance: float) -> bool:
    """True when every run after the second adds more than `tolerance` (relative) over the previous."""
    steps = [b - a for a, b in zip(values[1:], values[2:])]
    return bool(steps) and all(step > tolerance * max(values[1], 1.0) for step in steps)


def soak(workspace: Path, runs: int) -> dict[str, Any]:
    from components.core.config import load_params
    from components.core.overrides import write_overrides
    from flows.training import training_flow

    name = load_params(workspace / "params.yaml").tracking.registered_model
    records, trained = [], 0
    for i in range(runs):
        if 0 < i < runs - 1:
            write_overrides(workspace / "params.yaml", [f"finetune.learning_rate={1e-4 * (1 + i / 10):.6g}"])
        started = time.monotonic()
        result = training_flow(workdir=str(workspace))
        ran = [s["stage"] for s in result["stages"] if s["ran"]]
        trained += "evaluate" in ran
        status = dvc(workspace, "status", "--json").stdout.strip()
        record = {
            "run": i + 1,
            "seconds": round(time.monotonic() - started, 1),
            "stages_ran": ran,
            "dvc_clean": status in ("{}", ""),
            "registry_versions": registry_versions(workspace, name),
            "expected_versions": trained,
            **process_figures(),
        }
        print(json.dumps(record), flush=True)
        records.append(record)
    problems = [f"run {r['run']}: dvc status not clean" for r in records if not r["dvc_clean"]]
    problems += [
        f"run {r['run']}: {r['registry_versions']} registry versions, expected {r['expected_versions']}"
        for r in records
        if r["registry_versions"] != r["expected_versions"]
    ]
    if records[-1]["stages_ran"]:
        problems.append(f"last run changed nothing but ran {records[-1]['stages_ran']}")
    if grows_steadily([r["rss_mb"] for r in records], 0.05):
        problems.append("memory grows run over run")
    if grows_steadily([float(r["fds"]) for r in records], 0.0):
        problems.append("open file descriptors grow run over run")
    return {"runs": records, "problems": problems, "ok": not problems}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", default=str(REPO.parent / "shared/datasets/flower_photos"), help="folder of class sub-folders"
    )
    parser.add_argument("--per-class", type=int, default=30, help="images per class copied from the source")
    parser.add_argument("--runs", type=int, default=5, help="training flow runs in a row")
    parser.add_argument(
        "--workdir", default=str(REPO / "benchmarks" / "work" / "soak"), help="where the fresh workspace goes"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)  # our own scratch folder from an earlier soak, never user data
    subset = work / "source"
    for class_dir in sorted(p for p in Path(args.source).iterdir() if p.is_dir()):
        (subset / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[: args.per_class]:
            shutil.copy2(f, subset / class_dir.name / f.name)
    workspace = make_workspace(work / "workspace", subset, SMALL)
    result = soak(workspace, args.runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        f"| {r['run']} | {r['seconds']} | {', '.join(r['stages_ran']) or 'none (skipped)'} | {r['dvc_clean']} | "
        f"{r['registry_versions']} | {r['rss_mb']} | {r['fds']} |"
        for r in result["runs"]
    ]
    (RESULTS / "soak.md").write_text(
        "\n".join(
            [
                "# Soak",
                "",
                "| run | s | stages ran | dvc clean | versions | RSS MB | fds |",
                "|---|---|---|---|---|---|---|",
                *rows,
                "",
                "Problems: " + ("; ".join(result["problems"]) or "none"),
            ]
        )
        + "\n"
    )
    print("soak:", "ok" if result["ok"] else "; ".join(result["problems"]))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
