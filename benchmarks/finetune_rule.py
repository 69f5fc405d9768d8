"""Benchmark: which fine-tuning depth and peak learning rate beat the frozen head on val, by data size.

    python -m benchmarks.finetune_rule [--rows flowers-20,flowers-50,...] [--grid 30:5e-5,100:2e-4]

Reads the workspaces `make benchmark-sizes` leaves (benchmarks/work/sizes/<row>/workspace: its validated
manifest, augment policy and trained head) and reruns only the finetune stage (this checkout's code) there, once
per grid point, into sweeps/<point>/ of that workspace (the row's own models/finetune is the default point, read as is).
Each run scores the head and the fine-tuned weights on the row's val split (components.modeling.model_choice),
so the table is val only: nothing here reads test. Results: benchmarks/results/finetune_rule.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.run import RESULTS
from benchmarks.workspace import REPO, deep_update, tool_env

SIZES_WORK = REPO / "benchmarks/work/sizes"
DEFAULT_ROWS = "flowers-20,flowers-50,hymenoptera,flowers-100,flowers-200"
DEFAULT_GRID = "30:5e-5,30:2e-4,100:5e-5"  # the row's own run is the default point (params.yaml)
RUN_KEYS = (
    "kept",
    "val_images",
    "val_accuracy_head",
    "val_log_loss_head",
    "val_accuracy_finetuned",
    "val_log_loss_finetuned",
    "best_epoch",
    "epochs_run",
    "seconds",
    "trainable_backbone_layers",
)


def parse_grid(text: str) -> list[tuple[int, float]]:
    """'30:5e-5,100:2e-4' -> [(30, 5e-05), (100, 0.0002)]: (unfreeze_layers, learning_rate) points."""
    points = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        depth, rate = item.split(":")
        points.append((int(depth), float(rate)))
    return points


def point_name(depth: int, rate: float) -> str:
    return f"layers{depth}_lr{rate:g}"


def run_point(workspace: Path, depth: int, rate: float) -> dict[str, Any]:
    """finetune alone in `workspace` with one (depth, rate); its run.json figures and wall seconds."""
    out = workspace / "sweeps" / point_name(depth, rate)
    seconds = finetune_in(workspace, out, {"unfreeze_layers": depth, "learning_rate": rate})
    return {**read_run(out / "model"), "wall_seconds": seconds}


def finetune_in(workspace: Path, out: Path, overrides: dict[str, Any]) -> float:
    """Run this checkout's finetune stage (not the workspace's copy of components/) in `workspace`, with `overrides`
    of its finetune section, into out/{params.yaml,model,reports,checkpoints}; its wall seconds."""
    out.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    deep_update(params, {"finetune": overrides})
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    entry = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from components.finetune import main; "
        "from components.core.runtime import exit_process; exit_process(main(sys.argv[1:]))"
    )
    command = [
        sys.executable,
        "-c",
        entry,
        f"--params={out / 'params.yaml'}",
        f"--out-dir={out / 'model'}",
        f"--report-dir={out / 'reports'}",
        f"--checkpoint-dir={out / 'checkpoints'}",
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=workspace, env=tool_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"finetune failed in {workspace} with {overrides}:\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - started, 1)


def read_run(model_dir: Path) -> dict[str, Any]:
    info = json.loads((model_dir / "run.json").read_text())
    gain = info["val_intervals"].get("finetuned_minus_head")
    return {key: info.get(key) for key in RUN_KEYS} | {"gain_interval": gain}


def train_per_class(workspace: Path) -> float:
    import pandas as pd

    frame = pd.read_csv(workspace / "data/validated.csv", keep_default_na=False)
    train = frame[frame["split"] == "train"]
    return round(len(train) / train["label"].nunique(), 1)


def sweep_row(row: str, grid: list[tuple[int, float]], work: Path) -> dict[str, Any]:
    workspace = work / row / "workspace"
    params = yaml.safe_load((workspace / "params.yaml").read_text())["finetune"]
    own = json.loads((workspace / "models/finetune/run.json").read_text())
    default = (params["unfreeze_layers"], own.get("peak_learning_rate") or params["learning_rate"])  # as applied
    points = {point_name(*default): {**read_run(workspace / "models/finetune"), "default": True}}
    for depth, rate in grid:
        if (depth, rate) != default:
            print(f"{row}: finetune at {depth} layers, peak rate {rate:g}", flush=True)
            points[point_name(depth, rate)] = {**run_point(workspace, depth, rate), "default": False}
    return {"row": row, "train_per_class": train_per_class(workspace), "points": points}


def write_report(rows: list[dict[str, Any]], results: Path, reading: list[str] | None = None) -> None:
    """finetune_rule.{json,md,png}; `reading`: paragraphs that say what the table shows (after it)."""
    rows = sorted(rows, key=lambda row: row["train_per_class"])
    (results / "finetune_rule.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Fine-tuning depth and peak learning rate against data size (val only)",
        "",
        "x86_64, 2 CPU cores. `python -m benchmarks.finetune_rule` on the workspaces of `make benchmark-sizes`: "
        "finetune rerun per point on the same head, manifest and seed. Gain: val accuracy fine-tuned minus head, "
        "with its paired 95% interval; kept: what `finetune.keep_head_if_not_better` chooses today (the fine-tuned "
        "weights only when the gain's interval lies above 0). Nothing here reads test.",
        "",
        "| data | train per class | layers | peak rate | val head | val fine-tuned | gain [95%] | "
        "log-loss head / fine-tuned | kept | seconds |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for row in rows:
        for name, p in row["points"].items():
            layers, rate = name.removeprefix("layers").split("_lr")
            gain = p["val_accuracy_finetuned"] - p["val_accuracy_head"]
            low, high = p["gain_interval"] or (float("nan"), float("nan"))
            lines.append(
                f"| {row['row']} | {row['train_per_class']} | {layers} | {rate}{' (default)' if p['default'] else ''} "
                f"| {p['val_accuracy_head']:.3f} | {p['val_accuracy_finetuned']:.3f} | {gain:+.3f} [{low:+.3f}, "
                f"{high:+.3f}] | {p['val_log_loss_head']:.3f} / {p['val_log_loss_finetuned']:.3f} | {p['kept']} | "
                f"{p['seconds']} |"
            )
    lines += ["", "![val gain of fine-tuning over the head](finetune_rule.png)"]
    for paragraph in reading or []:
        lines += ["", paragraph]
    (results / "finetune_rule.md").write_text("\n".join(lines) + "\n")
    plot(rows, results / "finetune_rule.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted({name for row in rows for name in row["points"]})
    for name in names:
        found = [(r["train_per_class"], r["points"][name]) for r in rows if name in r["points"]]
        found.sort(key=lambda item: item[0])
        xs = [x for x, _ in found]
        ys = [p["val_accuracy_finetuned"] - p["val_accuracy_head"] for _, p in found]
        ax.plot(xs, ys, marker="o", label=name.replace("_", ", "))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("val accuracy: fine-tuned - head")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune_rule", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="sizes rows whose workspaces to sweep")
    parser.add_argument("--grid", default=DEFAULT_GRID, help="unfreeze_layers:learning_rate points, comma-separated")
    parser.add_argument("--workdir", type=Path, default=SIZES_WORK, help="make benchmark-sizes' work folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for finetune_rule.json/.md/.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    grid, rows = parse_grid(args.grid), []
    for row in filter(None, args.rows.split(",")):
        rows.append(sweep_row(row, grid, args.workdir))
        write_report(rows, args.results)  # after every row: a cut-short run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
