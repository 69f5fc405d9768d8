"""Benchmark: accuracy against data size, the pipeline vs the careful plain-Keras baseline vs a linear probe.

    python -m benchmarks.sizes [--sizes 20,50,100,200,all] [--only flowers|hymenoptera]   (make benchmark-sizes)

flower_photos at k images per class, and hymenoptera_data (its train/ folder to train, its val/ folder as
test, as `benchmarks.run --test-from val` does). For every flower size the test split is the same: the images
whose content hash puts them in the test fraction, as ingest would split a folder (`assign_split`); the
rest is the training pool, and a size takes the first k images of each class in hash order, so smaller
sets are nested in larger ones. Each size goes to the pipeline as a CSV (path, label, split = train|test):
ingest carves val from train and tops it up to `ingest.min_val_per_class` (its own rule), validate may
quarantine or move files, and both baselines then read the pipeline's validated manifest: all three
methods see the same train, val and test images. Nothing is chosen on test.

Per row: each method's final test accuracy with its 95% Wilson interval, the best test accuracy it reached
at any epoch (the pipeline: per-epoch snapshots; careful: tested after every epoch; the probe: over its
C grid), seconds, and the machine's load average. Rows merge into benchmarks/results/sizes.json by name and
are written as each finishes (with sizes.md and sizes.png, benchmarks/sizes_report.py), so a partial run
keeps earlier rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.linear_probe import run_linear_probe
from benchmarks.run import RESULTS, remapped_manifest, run_careful_baseline, run_pipeline, split_folders
from benchmarks.sizes_report import judge, method_summary, write_report
from benchmarks.workspace import REPO, make_workspace
from components.core.overrides import add_set_argument

FLOWERS = REPO.parent / "shared/datasets/flower_photos"
HYMENOPTERA = REPO.parent / "shared/datasets/hymenoptera_data"
DEFAULT_SIZES = "20,50,100,200,all"


# --- nested subsets over one fixed test split -------------------------------------------------------


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pool_and_test(source: Path, seed: int, fractions: Any) -> tuple[dict[str, list[Path]], list[Path]]:
    """(training pool per class in hash order, test images) of a folder of class folders. Test: the files
    ingest's hash split would put in test; the pool: the rest, ordered by `split_position` (then hash, path)."""
    from components.ingestion.manifest_rows import assign_split, split_position

    pool: dict[str, list[tuple[float, str, Path]]] = {}
    test = []
    for path in sorted(source.glob("*/*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        sha = file_sha256(path)
        if assign_split(sha, seed, fractions) == "test":
            test.append(path)
        else:
            pool.setdefault(path.parent.name, []).append((split_position(sha, seed), sha, path))
    return {label: [p for *_, p in sorted(items)] for label, items in sorted(pool.items())}, test


def select_per_class(pool: dict[str, list[Path]], per_class: int | None) -> dict[str, list[Path]]:
    """The first `per_class` images of each class's pool (None: all of them)."""
    return {label: paths[:per_class] for label, paths in pool.items()}


def subset_table(pool: dict[str, list[Path]], test: list[Path], per_class: int | None, table: Path) -> Path:
    """A (path, label, split) CSV: the selected training images and every test image."""
    import pandas as pd

    rows = [
        {"path": str(p), "label": label, "split": "train"}
        for label, paths in select_per_class(pool, per_class).items()
        for p in paths
    ]
    rows += [{"path": str(p), "label": p.parent.name, "split": "test"} for p in test]
    table.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


# --- one row: the three methods on one data set ------------------------------------------------------


def _split_counts(workspace: Path) -> dict[str, int]:
    import pandas as pd

    counts = pd.read_csv(workspace / "data/validated.csv", keep_default_na=False)["split"].value_counts()
    return {s: int(counts.get(s, 0)) for s in ("train", "val", "test")}


def run_row(
    name: str,
    table: Path,
    source_root: Path,
    work: Path,
    settings: dict[str, Any],
    earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The pipeline, then the linear probe and the careful baseline on its validated manifest.

    `earlier` (this row in sizes.json, with --reuse-careful): its careful result is reused, not rerun, when the
    probe scores every C exactly as it did then (val and test, the same features and fit): the same split."""
    import keras

    from components.core.config import load_params

    load_before = os.getloadavg()
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    settings = json.loads(json.dumps(settings))
    settings.setdefault("ingest", {})["allowed_roots"] = [str(source_root)]
    workspace = make_workspace(work / "workspace", table, settings)
    params = load_params(workspace / "params.yaml")
    pipeline = run_pipeline(workspace, work / "snapshots")
    probe = run_linear_probe(workspace, params.model, params.train_head)
    keras.backend.clear_session()  # the probe's graphs, before the baseline builds its own
    careful, reused = reused_careful(earlier, probe), None
    if careful is None:
        folders = split_folders(workspace, work / "baseline_data")
        careful = run_careful_baseline(folders, params.model.alpha or 1.0, params.model.image_size, params.project.seed)
        keras.backend.clear_session()
    else:
        reused = careful_origin(earlier)
    counts = _split_counts(workspace)
    methods = {
        "pipeline": method_summary(pipeline, counts["test"]),
        "careful": method_summary(careful, counts["test"]),
        "probe": method_summary(probe, counts["test"]),
    }
    return {
        "name": name,
        "started_utc": started_utc,
        "counts": counts,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "methods": methods,
        "checks": judge(methods, counts["test"]),
        "details": {
            "pipeline_curve": pipeline["curve"],
            "pipeline_stage_seconds": pipeline["stage_seconds"],
            "careful_curve": careful["curve"],
            "probe_grid": probe["grid"],
            "probe_chosen_C": probe["chosen_C"],
            "pipeline_choice": pipeline_choice(workspace, pipeline["metrics"]),
            "careful_reused_from": reused,
        },
    }


def reused_careful(earlier: dict[str, Any] | None, probe: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier run's careful result when its probe grid equals `probe`'s (same split), else None."""
    if not earlier or earlier["details"].get("probe_grid") != probe["grid"]:
        return None
    careful = earlier["methods"]["careful"]
    print(f"careful: reusing the run of {earlier['started_utc']} (the probe scores every C as then)", flush=True)
    return {
        "test_accuracy_final": careful["final"],
        "best_test_accuracy": careful["best_any_epoch"],
        "total_seconds": careful["seconds"],
        "curve": earlier["details"]["careful_curve"],
    }


def pipeline_choice(workspace: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the pipeline decided on val (the kept model, both val accuracies, the temperature and the evidence
    for it) and its test ECE, with the ECE's bootstrap interval and a calibrated model's floor on this test set."""
    import pandas as pd

    from components.modeling.metrics import ece_sampling

    run = workspace / "models/finetune/run.json"
    info = json.loads(run.read_text()) if run.is_file() else {}
    found = workspace / "reports/finetune/calibration.json"
    calibration = json.loads(found.read_text()) if found.is_file() else {}
    predictions = pd.read_csv(workspace / "reports/test_predictions.csv", keep_default_na=False)
    sampling = ece_sampling(predictions["probability"], predictions["actual"] == predictions["predicted"])
    keys = ("kept", "val_accuracy_head", "val_accuracy_finetuned")
    head = workspace / "models/head/run.json"
    head_info = json.loads(head.read_text()) if head.is_file() else {}
    # null: Adam alone (solver adam); no key at all: a run from before the linear head existed
    solver = (head_info["head_solver"] or {"kept": "adam"}) if "head_solver" in head_info else {}
    return {
        **{k: info.get(k) for k in keys},
        "head_solver": solver.get("kept"),
        "temperature": calibration.get("temperature"),
        "temperature_fitted": calibration.get("fitted_temperature"),
        "temperature_p_value": calibration.get("p_value"),
        "test_ece": round(float(metrics["ece"]), 4),
        "test_ece_interval": [round(sampling["low"], 4), round(sampling["high"], 4)],
        "test_ece_calibrated_floor": round(sampling["floor"], 4),
    }


def _plan(sizes: list[str], only: str | None) -> list[tuple[str, int | None]]:
    """(data set, images per class) in run order: flower sizes smallest first, hymenoptera, then all flowers."""
    numeric = sorted(int(s) for s in sizes if s != "all")
    plan: list[tuple[str, int | None]] = []
    if only in (None, "flowers"):
        plan += [("flowers", k) for k in numeric]
    if only in (None, "hymenoptera"):
        plan.append(("hymenoptera", None))
    if only in (None, "flowers") and "all" in sizes:
        plan.append(("flowers", None))
    return plan


def row_name(data: str, per_class: int | None) -> str:
    return data if data == "hymenoptera" else f"{data}-{per_class or 'all'}"


def save_row(results: Path, row: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge `row` into sizes.json by name (earlier rows stay), then rewrite sizes.md and sizes.png."""
    path = results / "sizes.json"
    result = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    result.update(extra)
    result["rows"][row["name"]] = row
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, results)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sizes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="flower images per class, comma-separated; all = every")
    parser.add_argument("--only", choices=("flowers", "hymenoptera"), help="run one data set's rows")
    parser.add_argument("--flowers", default=str(FLOWERS), help="folder of class folders")
    parser.add_argument("--hymenoptera", default=str(HYMENOPTERA), help="folder with train/ and val/")
    parser.add_argument(
        "--workdir",
        default=str(REPO / "benchmarks" / "work" / "sizes"),
        help="parent of each row's workspace (a row's folder is replaced when it runs again)",
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder for sizes.json/.md/.png")
    add_set_argument(
        parser, "params override for the pipeline run and the probe's backbone (e.g. for a small smoke run)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite sizes.md and sizes.png from sizes.json")
    parser.add_argument(
        "--reuse-careful",
        action="store_true",
        help="reuse a row's careful baseline from sizes.json when the probe shows the same split (it scores every C "
        "exactly as then): for rerunning the pipeline after a change to it",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = Path(args.results)
    if args.report_only:
        write_report(json.loads((results / "sizes.json").read_text()), results)
        return 0
    from components.core.config import apply_overrides, load_params

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if any(s != "all" and not s.isdigit() for s in sizes):
        raise SystemExit(f"--sizes: expected positive integers or 'all', got {args.sizes!r}")
    settings = apply_overrides({}, args.overrides)
    params = load_params(REPO / "params.yaml", args.overrides)
    flowers = Path(args.flowers).resolve()
    pool, test = (
        pool_and_test(flowers, params.project.seed, params.ingest.split) if args.only != "hymenoptera" else ({}, [])
    )
    extra = {"machine": f"{os.uname().machine}, {os.cpu_count()} CPU cores", "settings": args.overrides}
    for data, per_class in _plan(sizes, args.only):
        name = row_name(data, per_class)
        work = Path(args.workdir) / name
        shutil.rmtree(work, ignore_errors=True)
        print(f"=== {name} ===", flush=True)
        if data == "hymenoptera":
            root = Path(args.hymenoptera).resolve()
            table = remapped_manifest(root, "val", work / "source.csv")
        else:
            root, table = flowers, subset_table(pool, test, per_class, work / "source.csv")
        started = time.monotonic()
        earlier = _earlier_row(results, name) if args.reuse_careful else None
        row = run_row(name, table, root, work, settings, earlier)
        row.update(data=data, per_class=per_class, row_seconds=round(time.monotonic() - started, 1))
        row["images_per_class_given"] = _given_per_class(table)
        save_row(results, row, extra)
    return 0


def careful_origin(earlier: dict[str, Any] | None) -> str | None:
    """When the reused careful baseline really ran: the earlier row's own start, or where that row reused it from."""
    if earlier is None:
        return None
    return earlier.get("details", {}).get("careful_reused_from") or earlier["started_utc"]


def _earlier_row(results: Path, name: str) -> dict[str, Any] | None:
    path = results / "sizes.json"
    return json.loads(path.read_text())["rows"].get(name) if path.is_file() else None


def _given_per_class(table: Path) -> float:
    """Mean training images per class in the source table (before val is carved out): the plot's x."""
    import pandas as pd

    train = pd.read_csv(table)
    train = train[train["split"] == "train"]
    return round(len(train) / train["label"].nunique(), 1)


if __name__ == "__main__":
    sys.exit(main())
