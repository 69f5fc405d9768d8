"""Benchmark: the pipeline against two plain-Keras baselines, same data, split, machine and backbone.

    python -m benchmarks.run --source ../shared/datasets/flower_photos      (make benchmark SOURCE=...)

1. The pipeline runs in a fresh workspace through the Prefect flow, ingest to a registered,
   exported model. With `TP_EPOCH_SNAPSHOTS` set, train_head and finetune save their weights after
   every epoch (components/modeling/snapshots.py); after the run each snapshot is scored on the test split,
   so the pipeline's test accuracy is known after every epoch of both stages, at the wall time the
   epoch ended (counted from the start of ingest, minus the snapshot saves). No stage reads test.
2. Baseline "recipe": the Keras transfer-learning lesson as written, adapted only to N classes and
   the same backbone and split: image_dataset_from_directory, frozen base in a Sequential (BatchNorm
   left in training mode when unfrozen), GAP, Dense(1024, relu), softmax, Adam defaults, 10 epochs;
   then all but the first 100 layers unfrozen, Adam defaults again, 5 epochs.
3. Baseline "careful": what a good engineer writes from the Keras guide "Transfer learning &
   fine-tuning": decoded images cached in memory, RandomFlip + RandomRotation(0.1) layers, the base
   called with training=False (BatchNorm stays in inference mode when unfrozen), GAP, Dropout(0.2),
   softmax, Adam 1e-3 for 10 epochs; then the whole base unfrozen, recompiled with Adam 1e-5, 5 epochs.
   Both baselines are tested after every epoch; that time is left out of their training time.
4. One accuracy experiment on the pipeline's final model, judged on val (never on test):
   horizontal-flip test-time augmentation.

Both baselines read the pipeline's validated manifest (per-split folders of symlinks), so all three
see the same images. Results: benchmarks/results/<name>.json, .md and _curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.workspace import REPO, make_workspace, tool_env

RESULTS = REPO / "benchmarks" / "results"
BASELINES = ("recipe", "careful")
TARGETS = {"final_test_accuracy": 0.94, "time_to_careful_best_ratio": 0.25, "whole_run_vs_careful_training": 1.0}


# --- the pipeline --------------------------------------------------------------------------------


def run_pipeline(workspace: Path, snapshots: Path) -> dict[str, Any]:
    started = time.time()
    env = {**tool_env(), "TP_EPOCH_SNAPSHOTS": str(snapshots)}
    proc = subprocess.run([sys.executable, "-m", "flows.training"], cwd=workspace, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed (exit {proc.returncode})")
    total = time.time() - started
    metrics = json.loads((workspace / "metrics.json").read_text())
    head_accuracy = evaluate_model(workspace / "models/head/model.keras", workspace)
    curve = score_snapshots(workspace, snapshots, started)
    curve.append(
        {"phase": "registered", "epoch": None, "seconds": round(total, 1), "test_accuracy": metrics["accuracy"]}
    )
    return {
        "total_seconds": round(total, 1),
        "stage_seconds": _stage_seconds(workspace),
        "test_accuracy_after_head": head_accuracy,
        "test_accuracy_final": metrics["accuracy"],
        "best_test_accuracy": max(p["test_accuracy"] for p in curve),
        "curve": curve,
        "metrics": metrics,
        "flip_tta": flip_tta(workspace),
    }


def _stage_seconds(workspace: Path) -> dict[str, float]:
    """Per-stage wall time as the flow saw it (the last flow run's summary)."""
    summary = workspace / "reports" / "run_summary.json"
    if summary.is_file():
        return {s["stage"]: s["seconds"] for s in json.loads(summary.read_text())["stages"]}
    return {}


def split_arrays(workspace: Path, split_name: str, classes: list[str], size: int) -> tuple[Any, Any]:
    """(images as float32 0..255, labels) of one split of the validated manifest, decoded as evaluate does."""
    import numpy as np

    from components.modeling.data import load_rgb, load_split

    split = load_split(workspace / "data/validated.csv", split_name, classes)
    images = np.stack([load_rgb(workspace / p, size) for p in split.paths]).astype("float32")
    return images, np.asarray(split.labels)


def _load(model_path: Path) -> tuple[Any, list[str], int]:
    import keras

    from components.modeling import backbones  # noqa: F401  (registers custom layers)

    model = keras.models.load_model(model_path)
    classes = json.loads((model_path.parent / "classes.json").read_text())
    return model, classes, int(model.input_shape[1] or 224)


def _accuracy(probs: Any, labels: Any) -> float:
    return float((probs.argmax(1) == labels).mean())


def evaluate_model(model_path: Path, workspace: Path) -> float:
    """Test accuracy of a saved model dir's model."""
    model, classes, size = _load(model_path)
    images, labels = split_arrays(workspace, "test", classes, size)
    return _accuracy(model.predict(images, batch_size=64, verbose=0), labels)


def score_snapshots(workspace: Path, snapshots: Path, started_unix: float) -> list[dict[str, Any]]:
    """Test accuracy of every per-epoch snapshot, at the seconds since `started_unix` its epoch ended
    (the time spent saving earlier snapshots taken off)."""
    from components.modeling import backbones
    from components.modeling import snapshots as snaps

    records = snaps.read_log(snapshots)
    if not records:
        return []
    head_model, classes, size = _load(workspace / "models/head/model.keras")
    images, labels = split_arrays(workspace, "test", classes, size)
    features = backbones.feature_extractor(head_model).predict(images, batch_size=64, verbose=0)
    # Epoch snapshots are of the classifier being trained: one view, even if finetune then kept flip TTA.
    final_model = backbones.plain_classifier(_load(workspace / "models/finetune/model.keras")[0])
    curve, saving = [], 0.0
    for record in records:
        if record["weights_of"] == "head":
            head = head_model.get_layer(backbones.HEAD_LAYER)
            head.load_weights(record["path"])
            probs = head.predict(features, batch_size=256, verbose=0)
        else:
            model = head_model if record["stage"] == "train_head" else final_model
            model.load_weights(record["path"])
            probs = model.predict(images, batch_size=64, verbose=0)
        curve.append(
            {
                "phase": record["stage"],
                "epoch": record["epoch"],
                "seconds": round(record["ended_unix"] - started_unix - saving, 1),
                "test_accuracy": round(_accuracy(probs, labels), 4),
            }
        )
        saving += record["save_seconds"]
        print(
            f"pipeline {record['stage']} epoch {record['epoch']}: test accuracy {curve[-1]['test_accuracy']:.4f}",
            flush=True,
        )
    return curve


def flip_tta(workspace: Path) -> dict[str, Any]:
    """Val and test accuracy of the final classifier alone and averaged with its mirror image, and
    whether finetune kept the mean (it judges on val only; test is reported, never used)."""
    from components.modeling.backbones import plain_classifier

    saved, classes, size = _load(workspace / "models/finetune/model.keras")
    model = plain_classifier(saved)
    out: dict[str, Any] = {}
    for split_name in ("val", "test"):
        images, labels = split_arrays(workspace, split_name, classes, size)
        plain = model.predict(images, batch_size=64, verbose=0)
        mirrored = model.predict(images[:, :, ::-1, :], batch_size=64, verbose=0)
        out[f"{split_name}_plain"] = round(_accuracy(plain, labels), 4)
        out[f"{split_name}_flip_tta"] = round(_accuracy(plain + mirrored, labels), 4)
    out["keep"] = out["val_flip_tta"] > out["val_plain"]
    info = json.loads((workspace / "models/finetune/run.json").read_text())
    out["kept_by_finetune"] = bool(info.get("flip_tta"))
    out["crop_kept_by_finetune"] = bool(info.get("crop_tta"))  # 4 views: the image, its central crop, their mirrors
    return out


# --- the baselines -------------------------------------------------------------------------------


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


class _Clock:
    """Training time of a baseline: wall time since start, minus the per-epoch test evaluations."""

    def __init__(self) -> None:
        self.started, self.excluded = time.monotonic(), 0.0
        self.curve: list[dict[str, Any]] = []
        self.phase = ""

    def seconds(self) -> float:
        return round(time.monotonic() - self.started - self.excluded, 1)

    def tester(self, name: str, model: Any, test: Any) -> Any:
        import keras

        clock = self

        class TestEachEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                t0 = time.monotonic()
                acc = float(model.evaluate(test, verbose=0)[1])
                clock.excluded += time.monotonic() - t0
                clock.curve.append(
                    {
                        "phase": clock.phase,
                        "epoch": len(clock.curve) + 1,
                        "test_accuracy": round(acc, 4),
                        "seconds": clock.seconds(),
                    }
                )
                print(f"{name} {clock.phase} epoch {len(clock.curve)}: test accuracy {acc:.4f}", flush=True)

        return TestEachEpoch()

    def result(self, frozen_accuracy: float) -> dict[str, Any]:
        return {
            "total_seconds": self.seconds(),
            "test_accuracy_after_frozen": frozen_accuracy,
            "test_accuracy_final": self.curve[-1]["test_accuracy"],
            "best_test_accuracy": max(c["test_accuracy"] for c in self.curve),
            "curve": self.curve,
        }


def _datasets(folders: dict[str, Path], size: int, seed: int, cache: bool) -> tuple[Any, Any, Any]:
    import keras
    import tensorflow as tf

    def load(split: str, shuffle: bool) -> Any:
        ds = keras.utils.image_dataset_from_directory(
            folders[split], image_size=(size, size), batch_size=32, shuffle=shuffle, seed=seed
        )
        return ds.cache().prefetch(tf.data.AUTOTUNE) if cache else ds

    return load("train", True), load("val", False), load("test", False)


def _backbone(alpha: float, size: int) -> Any:
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(size, size, 3), include_top=False, weights="imagenet", alpha=alpha
    )


def run_recipe_baseline(
    folders: dict[str, Path], alpha: float, size: int, seed: int, frozen_epochs: int = 10, finetune_epochs: int = 5
) -> dict[str, Any]:
    import keras

    keras.utils.set_random_seed(seed)
    clock = _Clock()
    train, val, test = _datasets(folders, size, seed, cache=False)
    num_classes = len(os.listdir(folders["train"]))
    base = _backbone(alpha, size)
    base.trainable = False
    model = keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Rescaling(1.0 / 127.5, offset=-1.0),  # MobileNetV2's preprocess_input
            base,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    clock.phase = "frozen"
    model.fit(
        train, validation_data=val, epochs=frozen_epochs, callbacks=[clock.tester("recipe", model, test)], verbose=2
    )
    frozen_accuracy = clock.curve[-1]["test_accuracy"]
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    clock.phase = "finetune"
    model.fit(
        train, validation_data=val, epochs=finetune_epochs, callbacks=[clock.tester("recipe", model, test)], verbose=2
    )
    return clock.result(frozen_accuracy)


def run_careful_baseline(
    folders: dict[str, Path], alpha: float, size: int, seed: int, frozen_epochs: int = 10, finetune_epochs: int = 5
) -> dict[str, Any]:
    import keras

    keras.utils.set_random_seed(seed)
    clock = _Clock()
    train, val, test = _datasets(folders, size, seed, cache=True)
    num_classes = len(os.listdir(folders["train"]))
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)])
    base = _backbone(alpha, size)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(augmentation(inputs))
    x = base(x, training=False)  # BatchNorm stays in inference mode, also once the base is unfrozen
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    clock.phase = "frozen"
    model.fit(
        train, validation_data=val, epochs=frozen_epochs, callbacks=[clock.tester("careful", model, test)], verbose=2
    )
    frozen_accuracy = clock.curve[-1]["test_accuracy"]
    base.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    clock.phase = "finetune"
    model.fit(
        train, validation_data=val, epochs=finetune_epochs, callbacks=[clock.tester("careful", model, test)], verbose=2
    )
    return clock.result(frozen_accuracy)


# --- comparison and report -----------------------------------------------------------------------


def time_to(target: float, points: list[tuple[float, float]]) -> float | None:
    """First time (seconds) at which accuracy >= target, from (seconds, accuracy) points."""
    return next((t for t, acc in sorted(points) if acc >= target), None)


def _points(result: dict[str, Any]) -> list[tuple[float, float]]:
    return [(c["seconds"], c["test_accuracy"]) for c in result["curve"]]


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(pipeline: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Time to each baseline's best and to 0.90, and whole-run ratios, the pipeline against each baseline."""
    out: dict[str, Any] = {}
    for name, baseline in baselines.items():
        for label, target in ((f"{name}_best", baseline["best_test_accuracy"]), (f"{name}_0.90", 0.90)):
            pipe_t, base_t = time_to(target, _points(pipeline)), time_to(target, _points(baseline))
            out[f"time_to_{label}"] = {
                "target": target,
                "pipeline_seconds": pipe_t,
                "baseline_seconds": base_t,
                "ratio": _ratio(pipe_t, base_t),
            }
        out[f"whole_run_ratio_{name}"] = _ratio(pipeline["total_seconds"], baseline["total_seconds"])
    return out


def targets(pipeline: dict[str, Any], comparison: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's three targets on this machine, each with the measured value and whether it is met."""
    rows = [("final test accuracy", pipeline["test_accuracy_final"], ">=", TARGETS["final_test_accuracy"])]
    if "time_to_careful_best" in comparison:
        rows += [
            (
                "time to the careful recipe's best / its own time to it",
                comparison["time_to_careful_best"]["ratio"],
                "<=",
                TARGETS["time_to_careful_best_ratio"],
            ),
            (
                "whole pipeline / careful recipe's training",
                comparison["whole_run_ratio_careful"],
                "<=",
                TARGETS["whole_run_vs_careful_training"],
            ),
        ]
    return [
        {
            "target": what,
            "measured": value,
            "goal": f"{op} {goal}",
            "met": value is not None and (value >= goal if op == ">=" else value <= goal),
        }
        for what, value, op, goal in rows
    ]


def plot_curves(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, run in [("pipeline", result["pipeline"]), *result["baselines"].items()]:
        pts = _points(run)
        ax.plot([t for t, _ in pts], [a for _, a in pts], marker="o", markersize=3, label=name)
    ax.axhline(TARGETS["final_test_accuracy"], color="grey", linestyle=":", linewidth=1, label="target")
    ax.set(
        xlabel="seconds of training (pipeline: from the start of ingest)",
        ylabel="test accuracy",
        title=f"{result['name']}: test accuracy after every epoch",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) and value < 1.5 else str(value)


def to_markdown(result: dict[str, Any]) -> str:
    p, bs, c = result["pipeline"], result["baselines"], result["comparison"]
    names = list(bs)
    lines = [
        f"# Benchmark: {result['name']}",
        "",
        f"{result['machine']}. Source: `{result['source']}`; "
        f"split: the pipeline's validated manifest ({result['split_counts']}).",
        "",
        f"![test accuracy after every epoch]({result['name']}_curves.png)",
        "",
        "| | pipeline | " + " | ".join(f"baseline: {n}" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
        f"| test accuracy after the frozen stage | {_fmt(p['test_accuracy_after_head'])} | "
        + " | ".join(_fmt(bs[n]["test_accuracy_after_frozen"]) for n in names)
        + " |",
        "| final test accuracy | " + " | ".join(_fmt(r["test_accuracy_final"]) for r in [p, *bs.values()]) + " |",
        "| best test accuracy (any epoch) | "
        + " | ".join(_fmt(r["best_test_accuracy"]) for r in [p, *bs.values()])
        + " |",
        "| seconds (pipeline: ingest to registered model; baselines: training) | "
        + " | ".join(str(r["total_seconds"]) for r in [p, *bs.values()])
        + " |",
        "",
        _interval_line(p["test_accuracy_final"], result["split_counts"]),
        "",
        "Pipeline stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in p["stage_seconds"].items()),
        "",
        "| time to | target accuracy | pipeline s | baseline s | ratio |",
        "|---|---|---|---|---|",
    ]
    for key, t in c.items():
        if key.startswith("time_to_"):
            lines.append(
                f"| {key[len('time_to_') :]} | {t['target']:.4f} | {t['pipeline_seconds']} | "
                f"{t['baseline_seconds']} | {t['ratio']} |"
            )
    lines += [
        "",
        "Whole-run ratio (pipeline / baseline): " + ", ".join(f"{n} {c[f'whole_run_ratio_{n}']}" for n in names),
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t['target']} | {t['goal']} | {_fmt(t['measured'])} | {'yes' if t['met'] else '**no**'} |"
        for t in result["targets"]
    ]
    tta = p.get("flip_tta")
    if tta:
        lines += [
            "",
            "## Experiment: horizontal-flip test-time augmentation (judged on val)",
            "",
            "| | val | test |",
            "|---|---|---|",
            f"| plain | {tta['val_plain']:.4f} | {tta['test_plain']:.4f} |",
            f"| mean of image and mirror | {tta['val_flip_tta']:.4f} | {tta['test_flip_tta']:.4f} |",
            "",
            f"Better on val: {'yes' if tta['keep'] else 'no'}. " + _kept_views(tta),
        ]
    lines += [
        "",
        "## Per-epoch test accuracy",
        "",
        "| run | phase | epoch | seconds | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, run in [("pipeline", p), *bs.items()]:
        lines += [
            f"| {name} | {pt['phase']} | {pt['epoch'] or ''} | {pt['seconds']} | {pt['test_accuracy']:.4f} |"
            for pt in run["curve"]
        ]
    return "\n".join(lines) + "\n"


def _kept_views(tta: dict[str, Any]) -> str:
    """What finetune kept in the saved model (it decides on val accuracy: `finetune.flip_tta`, `finetune.crop_tta`)."""
    if tta.get("crop_kept_by_finetune"):
        kept = "the mean over 4 views (the image, its central crop and their mirrors: `finetune.crop_tta`)"
    elif tta.get("kept_by_finetune"):
        kept = "the mean of the image and its mirror (`finetune.flip_tta`)"
    else:
        return "Kept by finetune, which decides on val: one view."
    return (
        f"Kept by finetune, which decides on val: {kept}, so the registered model's test accuracy above is that "
        "mean; the per-epoch rows below are one view."
    )


def remapped_manifest(source: Path, test_folder: str, table: Path) -> Path:
    """A (path, label, split) table over `source/<split>/<class>/<file>` where `test_folder` becomes the
    test split and train stays train (ingest then carves val from train)."""
    import pandas as pd

    rows = []
    for folder, split in (("train", "train"), (test_folder, "test")):
        for path in sorted((source / folder).glob("*/*")):
            if path.is_file() and not path.name.startswith("."):
                rows.append({"path": str(path), "label": path.parent.name, "split": split})
    if not rows:
        raise SystemExit(f"{source}: no files under train/ or {test_folder}/")
    table.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on n images (how far one run's number can move)."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval_line(accuracy: float, split_counts: str) -> str:
    counts = {part.split()[1]: int(part.split()[0]) for part in split_counts.split(", ")}
    n = counts.get("test", 0)
    if not n:
        return "No test images: no interval."
    low, high = wilson_interval(accuracy, n)
    return (
        f"The pipeline's final test accuracy {accuracy:.4f} on {n} test images: 95% interval "
        f"{low:.3f}-{high:.3f} (one image is {1 / n:.3f})."
    )


def _split_counts(workspace: Path) -> str:
    import pandas as pd

    counts = pd.read_csv(workspace / "data/validated.csv", keep_default_na=False)["split"].value_counts()
    return ", ".join(f"{counts.get(s, 0)} {s}" for s in ("train", "val", "test"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", default=str(REPO.parent / "shared/datasets/flower_photos"), help="folder of class sub-folders"
    )
    parser.add_argument("--name", default="flowers", help="names the workspace and the result files")
    parser.add_argument(
        "--workdir", default=str(REPO / "benchmarks" / "work"), help="parent of the fresh workspace NAME"
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="params override for the pipeline run (e.g. for a small smoke run)",
    )
    parser.add_argument(
        "--baseline-epochs",
        type=int,
        nargs=2,
        default=[10, 5],
        metavar=("FROZEN", "FINETUNE"),
        help="epochs of both baselines' two phases",
    )
    parser.add_argument(
        "--baselines", nargs="*", default=list(BASELINES), choices=BASELINES, help="the baselines to run"
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder for <name>.json/.md/_curves.png")
    parser.add_argument(
        "--test-from",
        metavar="FOLDER",
        help="use the source's own held-out folder (e.g. val) as the test split; val is then "
        "carved from train (hymenoptera_data: 153 test images instead of 23)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite <name>.md and _curves.png from an existing <name>.json; run nothing",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = Path(args.results)
    if args.report_only:
        result = json.loads((results / f"{args.name}.json").read_text())
        plot_curves(result, results / f"{args.name}_curves.png")
        (results / f"{args.name}.md").write_text(to_markdown(result))
        return 0

    from components.core.config import apply_overrides, load_params

    work = Path(args.workdir) / args.name
    if work.exists():
        raise SystemExit(f"{work} exists: remove it or pass another --name/--workdir")
    settings = apply_overrides({}, args.settings)
    source = Path(args.source).resolve()
    if args.test_from:
        source = remapped_manifest(source, args.test_from, work / "source.csv")
        settings.setdefault("ingest", {})["allowed_roots"] = [str(Path(args.source).resolve())]
    workspace = make_workspace(work / "workspace", source, settings)
    params = load_params(workspace / "params.yaml")
    pipeline = run_pipeline(workspace, work / "snapshots")
    folders = split_folders(workspace, work / "baseline_data")
    runners: dict[str, Callable[..., dict[str, Any]]] = {"recipe": run_recipe_baseline, "careful": run_careful_baseline}
    baselines = {
        name: runners[name](
            folders, params.model.alpha or 1.0, params.model.image_size, params.project.seed, *args.baseline_epochs
        )
        for name in args.baselines
    }
    import tensorflow as tf

    comparison = compare(pipeline, baselines)
    result = {
        "name": args.name,
        "source": args.source,
        "settings": args.settings,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        f"GPU: {bool(tf.config.list_physical_devices('GPU'))}",
        "split_counts": _split_counts(workspace),
        "baseline_epochs": args.baseline_epochs,
        "pipeline": pipeline,
        "baselines": baselines,
        "comparison": comparison,
        "targets": targets(pipeline, comparison),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curves(result, results / f"{args.name}_curves.png")
    (results / f"{args.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
