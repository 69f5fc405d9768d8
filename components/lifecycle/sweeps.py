"""Sweeps over params: the points of a grid, and the comparison table and picture of their results.

The runs themselves are DVC experiments (queued by flows/sweep.py); this module only turns settings
into points and `dvc exp show --json` into a table and a plot. The best point is chosen on the
validation split (fine-tune val accuracy), never on test.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd

from components.core import figures
from components.core.config import ParamsError, load_params
from components.core.files import atomic_file, write_csv

TABLE_METRICS = ["val_accuracy", "accuracy", "macro_f1", "ece", "train_seconds"]


def grid_points(
    grid: dict[str, list[Any]] | None = None, points: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Every combination of a grid ({"finetune.learning_rate": [1e-4, 2e-4]}), or the listed points."""
    if bool(grid) == bool(points):
        raise ParamsError("give either a grid (param -> values) or a list of points, not both or neither")
    if points:
        return [dict(point) for point in points]
    keys = list(grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ParamsError(f"sweep grid: {key} needs a non-empty list of values")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in point.items()]


def check_points(params_file: str | Path, points: list[dict[str, Any]]) -> None:
    """Validate every point against params.yaml's rules before anything is queued."""
    for i, point in enumerate(points):
        try:
            load_params(params_file, point_overrides(point))
        except ParamsError as exc:
            raise ParamsError(f"sweep point {i} {point}: {exc}") from None


def results_table(shown: list[dict[str, Any]], names: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per sweep point from `dvc exp show --json`: its settings, metrics, and state."""
    found: dict[str, dict[str, Any]] = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            if exp.get("name") in names and exp.get("revs"):
                found[exp["name"]] = exp["revs"][0]
    rows = []
    for name, point in names.items():
        rev = found.get(name)
        files = ((rev or {}).get("data") or {}).get("metrics") or {}
        test = (files.get("metrics.json") or {}).get("data") or {}
        training = (files.get("reports/finetune/metrics.json") or {}).get("data") or {}
        metrics = {**test, "val_accuracy": training.get("val_accuracy"), "train_seconds": training.get("train_seconds")}
        rows.append(
            {
                "experiment": name,
                **point,
                "state": "done" if test else "not run",
                **{m: metrics.get(m) for m in TABLE_METRICS},
            }
        )
    return pd.DataFrame(rows)


def best_point(table: pd.DataFrame) -> pd.Series | None:
    """Highest validation accuracy (ties: fewer training seconds); test accuracy is only reported."""
    done = table[table["state"] == "done"].dropna(subset=["val_accuracy"])
    if done.empty:
        return None
    return done.sort_values(["val_accuracy", "train_seconds"], ascending=[False, True]).iloc[0]


def write_reports(table: pd.DataFrame, out_dir: str | Path, name: str) -> dict[str, Path]:
    """<name>.csv, <name>.md and <name>.png (test accuracy against training seconds, per point)."""
    out_dir = Path(out_dir)
    paths = {"csv": out_dir / f"{name}.csv", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    write_csv(table, paths["csv"])
    best = best_point(table)
    lines = [f"# Sweep {name}", "", _markdown(table), ""]
    lines.append(
        f"Best on validation: **{best['experiment']}** (val accuracy {best['val_accuracy']:.4f}, "
        f"test {best['accuracy']:.4f}). Apply it: `python -m flows.sweep --apply {best['experiment']}`"
        if best is not None
        else "No point finished."
    )
    with atomic_file(paths["md"]) as fh:
        fh.write("\n".join(lines) + "\n")
    _plot(table, name, paths["png"])
    return paths


def _markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def _plot(table: pd.DataFrame, name: str, path: Path) -> None:
    done = table[table["state"] == "done"]
    fig, ax = figures.pyplot().subplots(figsize=(7, 4.5))
    ax.scatter(done["train_seconds"], done["accuracy"], label="test accuracy")
    ax.scatter(done["train_seconds"], done["val_accuracy"], marker="x", label="val accuracy")
    for row in done.itertuples(index=False):
        ax.annotate(
            row.experiment, (row.train_seconds, row.accuracy), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlabel("training seconds (train_head + finetune)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"sweep {name}: accuracy against training time")
    ax.grid(alpha=0.3)
    ax.legend()
    figures.save_png(fig, path, dpi=100)
