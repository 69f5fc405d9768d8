"""benchmarks/finetune_rule.py and benchmarks/levers.py: the grid, the val-only tables. No training: run.json
files and probabilities stand in for the stage's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import finetune_rule, levers


def test_grid_points_parse_and_name_themselves() -> None:
    assert finetune_rule.parse_grid("30:5e-5, 100:2e-4,") == [(30, 5e-05), (100, 0.0002)]
    assert finetune_rule.point_name(30, 5e-05) == "layers30_lr5e-05"
    with pytest.raises(ValueError):
        finetune_rule.parse_grid("30")


def _run_json(folder: Path, head: float, finetuned: float) -> None:
    folder.mkdir(parents=True)
    info = {
        "kept": "finetuned" if finetuned > head else "head",
        "val_images": 60,
        "val_accuracy_head": head,
        "val_log_loss_head": 0.3,
        "val_accuracy_finetuned": finetuned,
        "val_log_loss_finetuned": 0.25,
        "best_epoch": 3,
        "epochs_run": 7,
        "seconds": 41.0,
        "trainable_backbone_layers": 100,
        "val_intervals": {"finetuned_minus_head": [-0.05, 0.12]},
    }
    (folder / "run.json").write_text(json.dumps(info))


def test_the_rule_table_reads_each_points_val_decision_and_never_a_test_figure(tmp_path: Path) -> None:
    _run_json(tmp_path / "model", 0.85, 0.9)
    found = finetune_rule.read_run(tmp_path / "model")
    assert found["kept"] == "finetuned" and found["gain_interval"] == [-0.05, 0.12]
    assert not any("test" in key for key in found)
    points = {"layers100_lr0.0002": {**found, "default": True}}
    rows = [{"row": "flowers-20", "train_per_class": 14.2, "points": points}]
    finetune_rule.write_report(rows, tmp_path)
    text = (tmp_path / "finetune_rule.md").read_text()
    assert "| flowers-20 | 14.2 | 100 | 0.0002 (default) | 0.850 | 0.900 | +0.050 [-0.050, +0.120] |" in text
    assert (tmp_path / "finetune_rule.png").stat().st_size > 0


def test_levers_are_scored_against_one_view_on_the_same_images(tmp_path: Path) -> None:
    labels = np.array([0, 1, 1, 0])
    whole = np.array([[0.6, 0.4], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])  # 3 of 4 right
    mirror = np.array([[0.6, 0.4], [0.2, 0.8], [0.2, 0.8], [0.9, 0.1]])  # its mean with whole: 4 of 4
    views = {"whole": whole, "mirror": mirror, "crop": whole, "crop_mirror": whole}
    rows = levers.lever_rows(views, labels)
    assert rows["one view"]["val_accuracy"] == 0.75 and rows["flip"]["val_accuracy"] == 1.0
    assert rows["crops"]["val_accuracy"] == 0.75  # image 2: (3 x 0.6 + 0.2) / 4 = 0.5, a tie argmax gives to class 0
    low, high = rows["flip"]["gain_interval"]
    assert low < 0.25 < high
    levers.write_report({"hymenoptera": {"val_images": 4, "levers": rows}}, tmp_path)
    assert "| hymenoptera | 4 | flip | 1.000 |" in (tmp_path / "levers.md").read_text()


def test_training_levers_are_scored_against_the_run_without_them_and_reuse_finished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import training_levers

    workspace = tmp_path / "hymenoptera/workspace"
    (workspace / "data").mkdir(parents=True)
    (workspace / "params.yaml").write_text("finetune:\n  epochs: 12\n")
    (workspace / "data/validated.csv").write_text("path,label,split\na.jpg,ants,train\nb.jpg,bees,train\n")
    labels = np.array([0, 1, 1, 0])
    right = {"none": 3, "ema": 4, "mixup": 2}  # images each run gets right, of 4
    runs: list[dict] = []

    def fake_finetune(ws: Path, out: Path, overrides: dict) -> float:
        runs.append(overrides)
        (out / "model").mkdir(parents=True)
        (out / "params.yaml").write_text(json.dumps({"finetune": {"epochs": 12, **overrides}}))
        (out / "model/run.json").write_text(json.dumps({"val_accuracy_head": 0.5, "best_epoch": 2, "epochs_run": 6}))
        return 1.0

    def fake_views(ws: Path, model_dir: Path, crop: bool):
        hits = right[model_dir.parent.name]
        probs = np.array([[0.9, 0.1] if (label == 0) == (i < hits) else [0.1, 0.9] for i, label in enumerate(labels)])
        return {"whole": probs}, labels

    monkeypatch.setattr(training_levers, "finetune_in", fake_finetune)
    monkeypatch.setattr(training_levers, "view_probabilities", fake_views)
    row = training_levers.measure_row("hymenoptera", ["ema", "mixup"], tmp_path)
    assert [run.get("ema_epochs") for run in runs] == [None, 0.5, None]
    assert all(run["keep_head_if_not_better"] is False and run["flip_tta"] == "off" for run in runs)
    assert row["levers"]["ema"]["val_accuracy"] == 1.0 and row["levers"]["mixup"]["val_accuracy"] == 0.5
    low, high = row["levers"]["mixup"]["gain_interval"]
    assert low < -0.25 < high < 0.5  # one image of four lost, paired with the run without levers
    training_levers.write_report([row], tmp_path)
    assert "| hymenoptera | 1.0 | 4 | ema | 1.000 |" in (tmp_path / "training_levers.md").read_text()

    training_levers.measure_row("hymenoptera", ["ema"], tmp_path)
    assert len(runs) == 3  # finished runs with the same settings are read, not rerun
    assert training_levers.main(["--levers", "ema,swa", "--workdir", str(tmp_path)]) == 2

    results = tmp_path / "results"
    results.mkdir()
    (results / "training_levers.json").write_text(json.dumps([{**row, "row": "flowers-20"}]))
    args = ["--rows", "hymenoptera", "--levers", "ema", "--workdir", str(tmp_path), "--results", str(results)]
    assert training_levers.main(args) == 0
    kept = json.loads((results / "training_levers.json").read_text())
    assert [row["row"] for row in kept] == ["flowers-20", "hymenoptera"]  # a run of one row keeps the others

    # A later run of some levers joins the row when its run without levers scores the same; else both rows stay.
    assert training_levers.main([*args[:3], "mixup", *args[4:]]) == 0
    merged = {row["row"]: row for row in json.loads((results / "training_levers.json").read_text())}
    assert set(merged["hymenoptera"]["levers"]) == {"none", "ema", "mixup"}
    right["none"] = 2  # as if the row's workspace had been rebuilt with another head
    assert training_levers.main([*args[:3], "mixup", *args[4:]]) == 0
    apart = {row["row"]: row for row in json.loads((results / "training_levers.json").read_text())}
    assert set(apart["hymenoptera"]["levers"]) == {"none", "mixup"}
    assert set(apart["hymenoptera (earlier workspace)"]["levers"]) == {"none", "ema", "mixup"}


def test_head_solver_scores_each_variant_on_val_from_the_cache_and_never_reads_test(tmp_path: Path) -> None:
    import shutil

    from benchmarks import head_solver

    workspace = tmp_path / "rows" / "flowers-20" / "workspace"
    cache = workspace / "data/cache/features/key"
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    for split, n in (("train", 90), ("val", 60)):  # train: 30 images, then their 2 augmented copies
        labels = np.tile(np.arange(30) % 3, 3) if split == "train" else np.arange(n) % 3
        (cache / split).mkdir(parents=True)
        np.save(cache / split / "features.npy", (centres[labels] + rng.normal(size=(n, 16))).astype(np.float32))
        np.save(cache / split / "labels.npy", labels.astype(np.int32))
    (cache / "test").mkdir()
    (cache / "test" / "features.npy").write_bytes(b"not an array: reading test would fail")
    (workspace / "models/head").mkdir(parents=True)
    info = {"feature_cache": str(cache), "val_accuracy": 0.81, "val_loss": 0.52}
    (workspace / "models/head/run.json").write_text(json.dumps(info))
    shutil.copy("params.yaml", workspace / "params.yaml")

    scores = head_solver.variant_scores(workspace)
    assert scores["train_images"] == 30 and scores["val_images"] == 60 and scores["trained_with"] == "adam"
    assert scores["adam"] == {"val_accuracy": 0.81, "val_loss": 0.52}  # from run.json: no linear head was fitted
    assert set(head_solver.VARIANTS) <= set(scores)
    assert all(0 < scores[name]["val_loss"] < 2 for name in head_solver.VARIANTS)
    text = head_solver.to_markdown({"rows": {"flowers-20": scores}})
    assert text.count("| flowers-20 | 30/60 | 0.5200 (0.810) |") == 1
    linear = scores["plain, own scale (the pipeline's)"]["val_loss"]
    assert text.rstrip().endswith("| linear |" if linear < 0.52 else "| Adam |")
