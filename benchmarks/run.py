"""Benchmark: the pipeline against the plain Keras transfer-learning recipe, same data, split, machine.

    python -m benchmarks.run --source ../shared/datasets/flower_photos      (make benchmark SOURCE=...)

1. The pipeline runs in a fresh workspace through the Prefect flow (ingest to registered model);
   wall time per stage comes from the flow's summary; test accuracy after the frozen stage is
   measured on the head model, after fine-tuning from metrics.json.
2. The baseline is the recipe of the Keras transfer-learning lesson, adapted only to N classes and
   the same backbone and split (the pipeline's validated manifest, via per-split symlink folders):
   image_dataset_from_directory, frozen base in a Sequential, GAP, Dense(1024, relu), softmax, Adam
   defaults, 10 epochs; then all but the first 100 layers unfrozen, Adam defaults again, 5 epochs.
   Test accuracy is measured after every epoch (that time is excluded from its training time).

Results: benchmarks/results/<name>.json and .md. Time-to-accuracy for the pipeline is measured at
stage boundaries (after train_head, after finetune), for the baseline after each epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from components import runtime  # noqa: F401  (telemetry off)

from benchmarks.workspace import REPO, make_workspace, tool_env

RESULTS = REPO / "benchmarks" / "results"


def run_pipeline(workspace: Path) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.training"], cwd=workspace, env=tool_env())
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed (exit {proc.returncode})")
    total = time.monotonic() - started
    metrics = json.loads((workspace / "metrics.json").read_text())
    stage_seconds = _stage_seconds(workspace)
    head_accuracy = evaluate_model(workspace / "models/head/model.keras", workspace / "data/validated.csv", workspace)
    return {"total_seconds": round(total, 1), "stage_seconds": stage_seconds,
            "test_accuracy_after_head": head_accuracy, "test_accuracy_final": metrics["accuracy"], "metrics": metrics}


def _stage_seconds(workspace: Path) -> dict[str, float]:
    """Per-stage wall time as the flow saw it (the last flow run's summary)."""
    summary = workspace / "reports" / "run_summary.json"
    if summary.is_file():
        return {s["stage"]: s["seconds"] for s in json.loads(summary.read_text())["stages"]}
    return {}


def evaluate_model(model_path: Path, manifest: Path, workspace: Path) -> float:
    import numpy as np

    from components import backbones  # noqa: F401  (registers custom layers)
    from components.data import load_rgb, load_split
    import keras

    model = keras.models.load_model(model_path)
    classes = json.loads((model_path.parent / "classes.json").read_text())
    split = load_split(manifest, "test", classes)
    size = int(model.input_shape[1] or 224)
    correct = 0
    for start in range(0, len(split), 64):
        batch = np.stack([load_rgb(workspace / p, size) for p in split.paths[start:start + 64]]).astype("float32")
        correct += int((model.predict(batch, verbose=0).argmax(1) == split.labels[start:start + 64]).sum())
    return correct / len(split)


def split_folders(workspace: Path, out: Path) -> dict[str, Path]:
    """Per-split class folders of symlinks to the pipeline's validated images (same split)."""
    import pandas as pd

    frame = pd.read_csv(workspace / "data/validated.csv", keep_default_na=False)
    folders = {}
    for split in ("train", "val", "test"):
        for row in frame[frame["split"] == split].itertuples():
            link = out / split / row.label / f"{row.sha256[:16]}_{Path(row.path).name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((workspace / row.path).resolve())
        folders[split] = out / split
    return folders


def run_baseline(folders: dict[str, Path], alpha: float, size: int, seed: int,
                 frozen_epochs: int = 10, finetune_epochs: int = 5) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    load = lambda split, shuffle: keras.utils.image_dataset_from_directory(  # noqa: E731
        folders[split], image_size=(size, size), batch_size=32, shuffle=shuffle, seed=seed)
    started = time.monotonic()
    train, val, test = load("train", True), load("val", False), load("test", False)
    num_classes = len(train.class_names)
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights="imagenet", alpha=alpha)
    base.trainable = False
    model = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Rescaling(1.0 / 127.5, offset=-1.0),  # MobileNetV2's preprocess_input
        base,
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    curve: list[dict[str, Any]] = []
    excluded = 0.0

    class TestEachEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            nonlocal excluded
            t0 = time.monotonic()
            acc = float(model.evaluate(test, verbose=0)[1])
            excluded += time.monotonic() - t0
            curve.append({"phase": phase, "epoch": len(curve) + 1, "test_accuracy": acc,
                          "seconds": round(time.monotonic() - started - excluded, 1)})
            print(f"baseline {phase} epoch {len(curve)}: test accuracy {acc:.4f}", flush=True)

    phase = "frozen"
    model.fit(train, validation_data=val, epochs=frozen_epochs, callbacks=[TestEachEpoch()], verbose=2)
    frozen_accuracy = curve[-1]["test_accuracy"]
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    phase = "finetune"
    model.fit(train, validation_data=val, epochs=finetune_epochs, callbacks=[TestEachEpoch()], verbose=2)
    return {"total_seconds": round(time.monotonic() - started - excluded, 1), "test_accuracy_after_frozen": frozen_accuracy,
            "test_accuracy_final": curve[-1]["test_accuracy"], "best_test_accuracy": max(c["test_accuracy"] for c in curve),
            "curve": curve, "gpu": bool(tf.config.list_physical_devices("GPU"))}


def time_to(target: float, points: list[tuple[float, float]]) -> float | None:
    """First time (seconds) at which accuracy >= target, from (seconds, accuracy) points."""
    return next((t for t, acc in points if acc >= target), None)


def compare(pipeline: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    s = pipeline["stage_seconds"]
    through_head = sum(s.get(k, 0.0) for k in ("ingest", "validate", "augment", "train_head"))
    pipe_points = [(through_head, pipeline["test_accuracy_after_head"]),
                   (through_head + s.get("finetune", 0.0), pipeline["test_accuracy_final"])]
    base_points = [(c["seconds"], c["test_accuracy"]) for c in baseline["curve"]]
    out: dict[str, Any] = {}
    for name, target in (("baseline_best", baseline["best_test_accuracy"]), ("0.90", 0.90)):
        pipe_t, base_t = time_to(target, pipe_points), time_to(target, base_points)
        out[f"time_to_{name}"] = {"target": target, "pipeline_seconds": pipe_t, "baseline_seconds": base_t,
                                  "ratio": round(pipe_t / base_t, 3) if pipe_t and base_t else None}
    out["whole_run_ratio"] = round(pipeline["total_seconds"] / baseline["total_seconds"], 3)
    return out


def to_markdown(result: dict[str, Any]) -> str:
    p, b, c = result["pipeline"], result["baseline"], result["comparison"]
    lines = [f"# Benchmark: {result['name']}", "", f"{result['machine']}", "",
             "| | pipeline | baseline (plain Keras recipe) |", "|---|---|---|",
             f"| test accuracy after frozen stage | {p['test_accuracy_after_head']:.4f} | {b['test_accuracy_after_frozen']:.4f} |",
             f"| test accuracy after fine-tuning | {p['test_accuracy_final']:.4f} | {b['test_accuracy_final']:.4f} |",
             f"| whole run, seconds | {p['total_seconds']} | {b['total_seconds']} |", "",
             "Pipeline stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in p["stage_seconds"].items()), ""]
    for key in ("time_to_baseline_best", "time_to_0.90"):
        t = c[key]
        lines.append(f"- {key} (test accuracy >= {t['target']:.4f}): pipeline {t['pipeline_seconds']} s, "
                     f"baseline {t['baseline_seconds']} s, ratio {t['ratio']}")
    lines.append(f"- whole-run ratio (pipeline / baseline): {c['whole_run_ratio']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(REPO.parent / "shared/datasets/flower_photos"))
    parser.add_argument("--name", default="flowers")
    parser.add_argument("--workdir", default=str(REPO / "benchmarks" / "work"))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="params override for the pipeline run (e.g. for a small smoke run)")
    parser.add_argument("--baseline-epochs", type=int, nargs=2, default=[10, 5], metavar=("FROZEN", "FINETUNE"))
    args = parser.parse_args(argv)

    from components.config import apply_overrides, load_params

    work = Path(args.workdir) / args.name
    if work.exists():
        raise SystemExit(f"{work} exists: remove it or pass another --name/--workdir")
    settings = apply_overrides({}, args.settings)
    workspace = make_workspace(work / "workspace", Path(args.source).resolve(), settings)
    params = load_params(workspace / "params.yaml")
    pipeline = run_pipeline(workspace)
    folders = split_folders(workspace, work / "baseline_data")
    baseline = run_baseline(folders, params.model.alpha or 1.0, params.model.image_size, params.project.seed,
                            *args.baseline_epochs)
    result = {"name": args.name, "source": args.source, "settings": args.settings,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, GPU: {baseline['gpu']}",
              "pipeline": pipeline, "baseline": baseline, "comparison": compare(pipeline, baseline)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
