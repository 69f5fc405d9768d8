"""benchmarks/sizes.py: nested per-class subsets over one fixed test split, the report's checks, the probe's
choice on val. No training: files of random bytes stand in for images (the selection reads bytes only)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import sizes
from benchmarks.linear_probe import fit_probe
from benchmarks.sizes_report import judge, method_summary, to_markdown
from components.core.stage_config import SplitFractions
from components.ingestion.manifest_rows import assign_split, split_position

SEED = 42


@pytest.fixture
def source(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for label, n in (("ants", 60), ("bees", 45), ("wasps", 30)):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "src" / label / f"{i:03d}.jpg").write_bytes(rng.bytes(64))
    (tmp_path / "src" / "ants" / ".DS_Store").write_bytes(b"hidden")
    return tmp_path / "src"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_test_split_is_ingests_and_the_pool_is_the_rest_in_hash_order(source: Path) -> None:
    fractions = SplitFractions()
    pool, test = sizes.pool_and_test(source, SEED, fractions)
    assert test and all(assign_split(_sha(p), SEED, fractions) == "test" for p in test)
    pooled = [p for paths in pool.values() for p in paths]
    assert not set(pooled) & set(test)
    assert len(pooled) + len(test) == 135  # every image once; the hidden file nowhere
    for label, paths in pool.items():
        assert all(p.parent.name == label for p in paths)
        positions = [split_position(_sha(p), SEED) for p in paths]
        assert positions == sorted(positions)
    assert sizes.pool_and_test(source, SEED, fractions) == (pool, test)  # deterministic


def test_subsets_are_nested_per_class_and_never_take_a_test_image(source: Path, tmp_path: Path) -> None:
    pool, test = sizes.pool_and_test(source, SEED, SplitFractions())
    tables = {k: pd.read_csv(sizes.subset_table(pool, test, k, tmp_path / f"{k}.csv")) for k in (5, 20, 40, None)}
    for k, table in tables.items():
        train = table[table["split"] == "train"]
        assert set(table.loc[table["split"] == "test", "path"]) == {str(p) for p in test}  # one fixed test split
        assert not set(train["path"]) & {str(p) for p in test}
        for label, paths in pool.items():
            chosen = train.loc[train["label"] == label, "path"].tolist()
            assert chosen == [str(p) for p in paths[:k]]  # k per class (or all the pool has), hash order
    wasps = tables[40][(tables[40]["split"] == "train") & (tables[40]["label"] == "wasps")]
    assert len(pool["wasps"]) < 40 and len(wasps) == len(pool["wasps"])  # a small class gives all it has
    for small, large in ((5, 20), (20, 40), (40, None)):
        train = [set(tables[k].loc[tables[k]["split"] == "train", "path"]) for k in (small, large)]
        assert train[0] < train[1]


def test_plan_runs_smallest_first_then_hymenoptera_then_all() -> None:
    assert sizes._plan(["all", "100", "20"], None) == [
        ("flowers", 20),
        ("flowers", 100),
        ("hymenoptera", None),
        ("flowers", None),
    ]
    assert sizes._plan(["20", "all"], "flowers") == [("flowers", 20), ("flowers", None)]
    assert sizes._plan(["20"], "hymenoptera") == [("hymenoptera", None)]
    assert [sizes.row_name(*step) for step in sizes._plan(["50", "all"], None)] == [
        "flowers-50",
        "hymenoptera",
        "flowers-all",
    ]


def _result(final: float, best: float, seconds: float = 10.0) -> dict:
    return {"test_accuracy_final": final, "best_test_accuracy": best, "total_seconds": seconds}


def test_checks_compare_finals_and_the_best_baselines_interval() -> None:
    n = 100
    methods = {
        "pipeline": method_summary(_result(0.87, 0.88), n),
        "careful": method_summary(_result(0.85, 0.93), n),
        "probe": method_summary(_result(0.88, 0.90), n),
    }
    assert methods["pipeline"]["interval"][0] < 0.87 < methods["pipeline"]["interval"][1]
    checks = judge(methods, n)
    assert checks["pipeline_ge_careful"] and not checks["pipeline_ge_probe"]
    assert checks["best_baseline"]["method"] == "careful"
    low = checks["best_baseline"]["interval"][0]
    assert 0.86 < low < 0.87 and checks["pipeline_within_best_baseline_interval"]  # Wilson: 93/100 from 0.863
    methods["pipeline"] = method_summary(_result(0.86, 0.88), n)
    assert not judge(methods, n)["pipeline_within_best_baseline_interval"]


def test_markdown_has_a_row_per_data_set_and_names_missing_ones(tmp_path: Path) -> None:
    methods = {m: method_summary(_result(0.9, 0.92), 50) for m in ("pipeline", "careful", "probe")}
    row = {
        "name": "flowers-20",
        "data": "flowers",
        "images_per_class_given": 20.0,
        "counts": {"train": 70, "val": 30, "test": 50},
        "load_average_before": [1.0, 1.0, 1.0],
        "load_average_after": [2.0, 2.0, 2.0],
        "methods": methods,
        "checks": judge(methods, 50),
    }
    choice = {
        "head_solver": "lbfgs",
        "kept": "head",
        "val_accuracy_head": 0.9,
        "val_accuracy_finetuned": 0.85,
        "temperature": 1.0,
        "temperature_fitted": 0.612,
        "temperature_p_value": 0.147,
        "test_ece": 0.041,
        "test_ece_interval": [0.03, 0.08],
        "test_ece_calibrated_floor": 0.028,
    }
    older = {**row, "name": "hymenoptera", "data": "hymenoptera"}  # a row from before the choice was recorded
    text = to_markdown({"machine": "x86_64", "rows": {"flowers-20": {**row, "details": {"pipeline_choice": choice}}}})
    assert "| flowers-20 | 70/30/50 | 0.900 [" in text
    assert (
        "| flowers-20 | linear | head | 0.900 | 0.850 | 1.000 (fitted 0.612, p 0.15) | 0.041 [0.030, 0.080] | 0.028 |"
        in text
    )
    assert "Not run yet: flowers-50, flowers-100, flowers-200, flowers-all, hymenoptera" in text
    assert "Run with these settings" not in text  # the defaults
    changed = to_markdown({"machine": "x86_64", "settings": ["train_head.solver=auto"], "rows": {"flowers-20": row}})
    assert "Run with these settings over params.yaml: `train_head.solver=auto`." in changed
    assert "| hymenoptera | - | - | - | - | - | - | - |" in to_markdown(
        {"machine": "x86_64", "rows": {"hymenoptera": older}}
    )


def test_the_careful_baseline_is_reused_only_when_the_probe_shows_the_same_split() -> None:
    from benchmarks.sizes import reused_careful

    grid = [{"C": 0.1, "val_accuracy": 0.8, "val_log_loss": 0.5, "test_accuracy": 0.79}]
    earlier = {
        "started_utc": "2026-12-06T10:00:00+00:00",
        "methods": {"careful": {"final": 0.85, "best_any_epoch": 0.86, "seconds": 120.0}},
        "details": {"probe_grid": grid, "careful_curve": [{"epoch": 1, "test_accuracy": 0.86}]},
    }
    careful = reused_careful(earlier, {"grid": [dict(row) for row in grid]})
    assert careful == {
        "test_accuracy_final": 0.85,
        "best_test_accuracy": 0.86,
        "total_seconds": 120.0,
        "curve": [{"epoch": 1, "test_accuracy": 0.86}],
    }
    moved = [{**grid[0], "test_accuracy": 0.8}]  # one test image elsewhere: another split, run it again
    assert reused_careful(earlier, {"grid": moved}) is None
    assert reused_careful(None, {"grid": grid}) is None


def test_probe_chooses_its_regularisation_on_val() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 8)) * 3

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 3
        return centres[y] + rng.normal(size=(n, 8)), y

    best, models, table = fit_probe(draw(30), draw(30), grid=(1e-4, 1.0))
    assert len(models) == len(table) == 2
    assert table[best]["val_accuracy"] == max(row["val_accuracy"] for row in table)
    assert all(set(row) == {"C", "val_accuracy", "val_log_loss"} for row in table)  # no test anywhere


def test_a_baseline_reused_twice_keeps_the_date_it_really_ran() -> None:
    from benchmarks.sizes import careful_origin

    ran = {"started_utc": "2026-12-06T13:00:00+00:00", "details": {}}
    reused_once = {"started_utc": "2026-12-07T01:00:00+00:00", "details": {"careful_reused_from": ran["started_utc"]}}
    assert careful_origin(ran) == "2026-12-06T13:00:00+00:00"
    assert careful_origin(reused_once) == "2026-12-06T13:00:00+00:00"
    assert careful_origin(None) is None
