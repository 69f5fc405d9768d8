"""Benchmark: training levers of finetune, one at a time, on val (never test), each against the same run without it.

    python -m benchmarks.training_levers [--rows hymenoptera,flowers-200] [--levers ema,mixup]

Reads the workspaces `make benchmark-sizes` leaves and reruns only the finetune stage there (this checkout's code,
on the row's head, manifest and seed), once per lever and once without, into levers/<name>/ of that workspace.
Every run keeps its fine-tuned weights and leaves test-time augmentation and the temperature out
(`keep_head_if_not_better: false`, `flip_tta`/`crop_tta`/`calibrate: off`), so the table compares the training
alone. Each lever is a finetune setting; its default is off unless this table shows it winning:
- `ema`: the weights' exponential moving average over half an epoch, written into the model at every epoch's
  end (`finetune.ema_epochs: 0.5`);
- `mixup`: mixup of training images and labels at alpha 0.2 (`finetune.mixup_alpha: 0.2`);
- `discriminative rates`: the lowest trained backbone layer at a tenth of the peak rate, geometric up to the
  head (`finetune.bottom_lr_factor: 0.1`);
- `low-res phase`: progressive resizing, the first 3 of the 12 epochs on 160 px images, the rest at 224
  (`finetune.low_res_epochs: 3`, `low_res_size: 160`): a quarter of the epochs at about half the cost.

Scored on the row's val split (one view, benchmarks.levers.view_probabilities): accuracy, log-loss and the paired
95% interval of the accuracy gain over the run without levers.
Results: benchmarks/results/training_levers.{json,md,png}; rows merge by name with an earlier run's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.finetune_rule import SIZES_WORK, finetune_in, train_per_class
from benchmarks.levers import score, view_probabilities
from benchmarks.run import RESULTS

LEVERS: dict[str, dict[str, Any]] = {
    "none": {},
    "ema": {"ema_epochs": 0.5},
    "mixup": {"mixup_alpha": 0.2},
    "discriminative rates": {"bottom_lr_factor": 0.1},
    "low-res phase": {"low_res_epochs": 3, "low_res_size": 160},
}
# Training alone: the fine-tuned weights, one view, no temperature.
COMPARABLE = {"keep_head_if_not_better": False, "flip_tta": "off", "crop_tta": "off", "calibrate": "off"}
RUN_KEYS = ("val_accuracy_head", "best_epoch", "epochs_run", "seconds", "peak_learning_rate")


def lever_run(workspace: Path, name: str) -> tuple[dict[str, Any], Path]:
    """finetune with lever `name` in `workspace` (reusing a finished run with the same settings); its run.json
    figures and the model folder."""
    out = workspace / "levers" / name.replace(" ", "_")
    wanted = yaml.safe_load((workspace / "params.yaml").read_text())["finetune"] | COMPARABLE | LEVERS[name]
    done = out / "model/run.json"
    if not (done.exists() and yaml.safe_load((out / "params.yaml").read_text())["finetune"] == wanted):
        print(f"{workspace.parent.name}: finetune with lever {name!r}", flush=True)
        finetune_in(workspace, out, COMPARABLE | LEVERS[name])
    info = json.loads(done.read_text())
    low_res = (info.get("low_res_phase") or {}).get("epochs", 0)  # run before the validated epochs
    return {**{key: info.get(key) for key in RUN_KEYS}, "low_res_epochs": low_res}, out / "model"


def measure_row(row: str, levers: list[str], work: Path) -> dict[str, Any]:
    """Every lever of `levers` (and none) on one sizes row: val figures and the gain over none."""
    from components.core import intervals

    workspace = work / row / "workspace"
    scored: dict[str, Any] = {}
    for name in ["none", *[lever for lever in levers if lever != "none"]]:
        info, model_dir = lever_run(workspace, name)
        views, labels = view_probabilities(workspace, model_dir, crop=False)  # one view is scored
        scored[name] = {**info, **score(views["whole"], labels)}
    base = scored["none"]["correct"]
    results = {
        name: {
            **{key: s[key] for key in (*RUN_KEYS, "low_res_epochs")},
            "val_accuracy": round(s["accuracy"], 4),
            "val_log_loss": round(s["log_loss"], 4),
            "gain_interval": intervals.rounded(intervals.paired_difference(base, s["correct"])),
        }
        for name, s in scored.items()
    }
    return {"row": row, "train_per_class": train_per_class(workspace), "val_images": len(base), "levers": results}


READING = [
    "Reading it. No lever raised val accuracy beyond noise on any row: every interval holds 0 except mixup's on "
    "flowers-100, which lies below it. The largest loss is the EMA's on all of flower_photos (-0.041). So all stay "
    "off by default (`finetune.ema_epochs: 0`, `mixup_alpha: 0`, `bottom_lr_factor: 1`, `low_res_epochs: 0`): "
    "settings for data where the user's own val says otherwise. The run without levers reproduces the pipeline's "
    "own fine-tuned val accuracy on each row (finetune_rule.md, sizes.md, flowers.md), so each difference is the "
    "lever's; one seed each, so the interval is over val images, not over training runs.",
    "The low-resolution phase (progressive resizing: 3 of the 12 epochs at 160 px, then 224) is a speed lever: "
    "finetune took 14% less time on all of flower_photos (397 s against 461 s) and 15% less at 200 per class "
    "(109 s against 128 s), for -0.010 and +0.007 of val accuracy, both inside the noise; on hymenoptera it saved "
    "nothing (early stopping no longer cut the run short: 12 epochs against 7) and lost 2 of 60 val images. Lower "
    "on two of three rows and faster on two, it stays off; at the issue's time target it would not move the "
    "pipeline's time to the careful recipe's best either, which the head reaches before fine-tuning starts "
    "(flowers.md).",
    "A likely reason the other levers lose, not tested here: each damps or averages the updates, and finetune "
    "stops at 12 epochs, where the run without levers is still improving on the larger rows (best epoch 10 of 12 "
    "at 200 per class, 12 of 12 on all of flower_photos). The EMA measured is the one written into the model at "
    "every epoch's end, so training restarts from the average each epoch; a shadow average evaluated beside raw "
    "weights was not measured.",
    "Rows: hymenoptera, flower_photos at 100 and 200 images per class and all of it (flowers-all) from the "
    "workspaces of `make benchmark-sizes`, and all of flower_photos again from `make benchmark`'s workspace "
    "(flowers: its own split, 386 val images); hymenoptera's low-resolution run and its run without levers are "
    "from that workspace too, which scored exactly as the sizes one without levers (same split and head), so the "
    "row keeps the earlier levers. At 200 and on all the pipeline keeps the fine-tuned weights; "
    "below, the head. Best epoch / run counts the low-resolution epochs too. Not measured: gradual unfreezing "
    "and cutmix. Seconds: the finetune stage, with tests or CI sharing the 2 cores in the earlier rows; the "
    "low-resolution rows and their runs without levers ran back to back on a quiet machine.",
]


def write_report(rows: list[dict[str, Any]], results: Path) -> None:
    (results / "training_levers.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Training levers of finetune, one at a time, on val",
        "",
        "x86_64, 2 CPU cores. `python -m benchmarks.training_levers` on the workspaces of `make benchmark-sizes`: "
        "finetune rerun per lever on the row's head, manifest and seed, its fine-tuned weights kept, one view, no "
        "temperature. Gain: val accuracy minus the run without levers, with its paired 95% interval. Nothing here "
        "reads test.",
        "",
        "| data | train per class | val images | lever | val accuracy | val log-loss | gain [95%] | best epoch / run "
        "| seconds |",
        "|---|---:|---:|---|---:|---:|---|---|---:|",
    ]
    for row in sorted(rows, key=lambda r: r["train_per_class"]):
        for name, r in row["levers"].items():
            low, high = r["gain_interval"]
            gain = r["val_accuracy"] - row["levers"]["none"]["val_accuracy"]
            lines.append(
                f"| {row['row']} | {row['train_per_class']} | {row['val_images']} | {name} | {r['val_accuracy']:.3f} "
                f"| {r['val_log_loss']:.3f} | {gain:+.3f} [{low:+.3f}, {high:+.3f}] | {r['best_epoch']} / "
                f"{r['epochs_run'] + r.get('low_res_epochs', 0)} | {r['seconds']} |"
            )
    lines += ["", "![val gain of each lever](training_levers.png)"]
    for paragraph in READING:
        lines += ["", paragraph]
    (results / "training_levers.md").write_text("\n".join(lines) + "\n")
    plot(rows, results / "training_levers.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Each lever's val gain over none, with its interval, per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in LEVERS if name != "none"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, row in enumerate(sorted(rows, key=lambda r: r["train_per_class"])):
        found = [(i, row["levers"][name]) for i, name in enumerate(names) if name in row["levers"]]
        xs = np.array([i for i, _ in found]) + 0.15 * offset
        gains = np.array([r["val_accuracy"] - row["levers"]["none"]["val_accuracy"] for _, r in found])
        low = np.array([r["gain_interval"][0] for _, r in found])
        high = np.array([r["gain_interval"][1] for _, r in found])
        ax.errorbar(xs, gains, yerr=[gains - low, high - gains], fmt="o", capsize=3, label=row["row"])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("val accuracy gain over no lever")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_levers", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="hymenoptera,flowers-100,flowers-200", help="sizes rows to measure on")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"levers to run, of: {', '.join(LEVERS)}")
    parser.add_argument("--workdir", type=Path, default=SIZES_WORK, help="make benchmark-sizes' work folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for training_levers.json/.md/.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levers = [name.strip() for name in args.levers.split(",") if name.strip()]
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        print(f"unknown levers {unknown}; known: {', '.join(LEVERS)}", file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    rows = earlier_rows(args.results / "training_levers.json")
    for row in filter(None, args.rows.split(",")):
        rows.update(merge_row(rows.pop(row, None), measure_row(row, levers, args.workdir.resolve())))
        write_report(list(rows.values()), args.results)  # after every row: a cut-short run keeps what it measured
    return 0


def merge_row(earlier: dict[str, Any] | None, measured: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows to keep for one measured row: an earlier run's other levers join it when its run without levers
    scored exactly as today's (same head, split and seed: the gains compare with the same run); otherwise the
    earlier row stays beside it under its own name."""
    name = measured["row"]
    if earlier is None:
        return {name: measured}
    fields = ("val_accuracy", "val_log_loss")
    same = all(earlier["levers"]["none"][key] == measured["levers"]["none"][key] for key in fields)
    if same and earlier["val_images"] == measured["val_images"]:
        return {name: {**measured, "levers": {**earlier["levers"], **measured["levers"]}}}
    moved = f"{name} (earlier workspace)"
    return {moved: {**earlier, "row": moved}, name: measured}


def earlier_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows an earlier run wrote, by name: a run of some rows replaces those and keeps the others."""
    if not path.exists():
        return {}
    return {row["row"]: row for row in json.loads(path.read_text())}


if __name__ == "__main__":
    sys.exit(main())
