"""Sweeps: points from a grid, every point checked before queueing, the best chosen on val (never test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.core.config import ParamsError
from components.lifecycle.sweeps import (
    best_point,
    check_points,
    grid_points,
    point_overrides,
    results_table,
    write_reports,
)

REPO = Path(__file__).resolve().parents[2]


def test_grid_expands_to_every_combination_in_order():
    points = grid_points({"finetune.learning_rate": [1e-4, 2e-4], "finetune.unfreeze_layers": [60, 100]})
    assert points == [
        {"finetune.learning_rate": 1e-4, "finetune.unfreeze_layers": 60},
        {"finetune.learning_rate": 1e-4, "finetune.unfreeze_layers": 100},
        {"finetune.learning_rate": 2e-4, "finetune.unfreeze_layers": 60},
        {"finetune.learning_rate": 2e-4, "finetune.unfreeze_layers": 100},
    ]
    assert point_overrides(points[0]) == ["finetune.learning_rate=0.0001", "finetune.unfreeze_layers=60"]


def test_a_bad_point_is_refused_before_anything_is_queued():
    with pytest.raises(ParamsError, match=r"sweep point 1 .*finetune.learning_rate"):
        check_points(REPO / "params.yaml", [{"finetune.learning_rate": 1e-4}, {"finetune.learning_rate": -1}])
    with pytest.raises(ParamsError, match="either a grid"):
        grid_points({"a": [1]}, [{"a": 1}])


def _exp(name: str, val: float, test: float, seconds: float) -> dict:
    test_metrics = {"accuracy": test, "macro_f1": test, "ece": 0.05}
    training = {"val_accuracy": val, "train_seconds": seconds}
    return {
        "name": name,
        "revs": [
            {
                "data": {
                    "metrics": {
                        "metrics.json": {"data": test_metrics},
                        "reports/finetune/metrics.json": {"data": training},
                    }
                }
            }
        ],
    }


def test_best_point_is_chosen_on_validation_accuracy_not_test(tmp_path):
    shown = [
        {"rev": "workspace", "experiments": None},
        {"rev": "abc", "experiments": [_exp("s-1", 0.95, 0.90, 300), _exp("s-2", 0.93, 0.97, 200)]},
    ]
    names = {
        "s-1": {"finetune.learning_rate": 1e-4},
        "s-2": {"finetune.learning_rate": 2e-4},
        "s-3": {"finetune.learning_rate": 3e-4},
    }
    table = results_table(shown, names)
    assert table.set_index("experiment").loc["s-3", "state"] == "not run"  # stopped by the budget
    assert best_point(table)["experiment"] == "s-1"
    paths = write_reports(table, tmp_path, "lr")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "--apply s-1" in paths["md"].read_text()
