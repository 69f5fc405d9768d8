"""Benchmark: accuracy levers measured one at a time on val (never test), each against the pipeline's own model.

    python -m benchmarks.levers [--rows hymenoptera,flowers-200] [--workdir benchmarks/work/sizes]

Reads the workspaces `make benchmark-sizes` leaves and scores the model the pipeline saved
(models/finetune: its kept weights, temperature and flip decision) on that row's val split.

Levers so far (inference only, so one model serves them all):
- `flip`: the mean of the image's and its mirror's probabilities (what `finetune.flip_tta: auto` decides);
- `crops`: that mean over four views, the whole image and its central crop (backbones.CROP_FRACTION of each
  side, resized back), each with its mirror.

Each row: val accuracy and log-loss of one view, and of each lever, with the paired 95% interval of its
accuracy gain over one view (components/core/intervals.py). Results: benchmarks/results/levers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run import RESULTS
from benchmarks.workspace import REPO

SIZES_WORK = REPO / "benchmarks/work/sizes"


def view_probabilities(
    workspace: Path, model_dir: Path | None = None, crop: bool = True
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per view (whole, mirror, and with `crop` crop and crop mirror): the val probabilities of the classifier saved
    in `model_dir` (default: the row's models/finetune), through the views finetune judges (model_choice.val_views);
    the labels."""
    from components.core.config import load_params
    from components.core.contracts import MODEL_FILE, read_manifest
    from components.ingestion.images import ImageLimits
    from components.modeling import model_choice, model_folder
    from components.modeling.backbones import plain_classifier
    from components.modeling.data import load_split, make_dataset

    params = load_params(workspace / "params.yaml")
    model_dir = model_dir or workspace / "models/finetune"
    classes, info = model_folder.read_model_info(model_dir)
    frame = read_manifest(workspace / "data/validated.csv")
    frame["path"] = [str(workspace / path) for path in frame["path"]]  # the manifest's paths are the workspace's
    val = load_split(frame, "val", classes)
    model = model_folder.load_keras_model(model_dir / MODEL_FILE, expected_sha256=info.model_sha256)
    images = make_dataset(val, params.model.image_size, 32, limits=ImageLimits.from_config(params.validate))
    views = model_choice.val_views(plain_classifier(model), images, crop=crop)
    names = ("whole", "mirror", "crop", "crop_mirror") if crop else ("whole", "mirror")
    return dict(zip(names, views, strict=True)), np.asarray(val.labels)


def score(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    correct = probs.argmax(axis=1) == labels
    return {"accuracy": float(correct.mean()), "log_loss": float(-np.log(picked).mean()), "correct": correct}


def lever_rows(views: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, dict[str, Any]]:
    from components.core import intervals

    candidates = {
        "one view": views["whole"],
        "flip": (views["whole"] + views["mirror"]) / 2,
        "crops": sum(views.values()) / len(views),
    }
    scores = {name: score(probs, labels) for name, probs in candidates.items()}
    base = scores["one view"]["correct"]
    return {
        name: {
            "val_accuracy": round(s["accuracy"], 4),
            "val_log_loss": round(s["log_loss"], 4),
            "gain_interval": intervals.rounded(intervals.paired_difference(base, s["correct"])),
        }
        for name, s in scores.items()
    }


READING = [
    "The pipeline decides both levers per run on val (`finetune.flip_tta`, `finetune.crop_tta`: auto keeps each "
    "only when it raises val accuracy); this table shows what each would give on each row's saved model. Levers "
    "of training (weight EMA, mixup, discriminative learning rates, a low-resolution phase), each a finetune run "
    "of its own: training_levers.md. The fine-tuning depth and rate: finetune_rule.md. Not measured: gradual "
    "unfreezing, cutmix.",
]


def write_report(rows: dict[str, Any], results: Path) -> None:
    (results / "levers.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Accuracy levers, one at a time, on val",
        "",
        "x86_64, 2 CPU cores. `python -m benchmarks.levers` on the workspaces of `make benchmark-sizes`: the model "
        "the pipeline saved (kept weights and temperature), scored on the row's val split only. Gain: val accuracy "
        "minus one view's, with its paired 95% interval.",
        "",
        "| data | val images | lever | val accuracy | val log-loss | gain [95%] |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row, found in rows.items():
        for lever, r in found["levers"].items():
            low, high = r["gain_interval"]
            gain = r["val_accuracy"] - found["levers"]["one view"]["val_accuracy"]
            lines.append(
                f"| {row} | {found['val_images']} | {lever} | {r['val_accuracy']:.3f} | {r['val_log_loss']:.3f} | "
                f"{gain:+.3f} [{low:+.3f}, {high:+.3f}] |"
            )
    for paragraph in READING:
        lines += ["", paragraph]
    (results / "levers.md").write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", default="hymenoptera,flowers-20,flowers-50,flowers-100,flowers-200", help="sizes rows to score"
    )
    parser.add_argument("--workdir", type=Path, default=SIZES_WORK, help="make benchmark-sizes' work folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for levers.json/.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for row in filter(None, args.rows.split(",")):
        views, labels = view_probabilities(args.workdir / row / "workspace")
        rows[row] = {"val_images": len(labels), "levers": lever_rows(views, labels)}
        write_report(rows, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
