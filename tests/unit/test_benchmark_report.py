"""benchmarks/run.py's arithmetic: time-to-accuracy, ratios against both baselines, targets, report."""

from __future__ import annotations

from benchmarks import run


def _run(points: list[tuple[float, float]], total: float, **extra: object) -> dict:
    curve = [{"phase": "p", "epoch": i + 1, "seconds": t, "test_accuracy": a} for i, (t, a) in enumerate(points)]
    return {
        "curve": curve,
        "total_seconds": total,
        "best_test_accuracy": max(a for _, a in points),
        "test_accuracy_final": points[-1][1],
        **extra,
    }


def test_time_to_is_the_first_point_at_or_over_the_target() -> None:
    points = [(10.0, 0.5), (20.0, 0.9), (30.0, 0.85), (40.0, 0.95)]
    assert run.time_to(0.9, points) == 20.0
    assert run.time_to(0.95, points) == 40.0
    assert run.time_to(0.96, points) is None
    assert run.time_to(0.9, list(reversed(points))) == 20.0  # order of the points does not matter


def test_compare_against_each_baseline() -> None:
    pipeline = _run([(50.0, 0.86), (100.0, 0.91), (300.0, 0.93)], total=320.0)
    careful = _run([(20.0, 0.8), (200.0, 0.88), (400.0, 0.87)], total=400.0)
    recipe = _run([(30.0, 0.85), (300.0, 0.6)], total=360.0)
    out = run.compare(pipeline, {"recipe": recipe, "careful": careful})
    assert out["time_to_careful_best"] == {
        "target": 0.88,
        "pipeline_seconds": 100.0,
        "baseline_seconds": 200.0,
        "ratio": 0.5,
    }
    assert out["time_to_recipe_best"]["ratio"] == round(50.0 / 30.0, 3)
    assert out["time_to_careful_0.90"] == {
        "target": 0.9,
        "pipeline_seconds": 100.0,
        "baseline_seconds": None,
        "ratio": None,
    }
    assert out["whole_run_ratio_careful"] == 0.8 and out["whole_run_ratio_recipe"] == round(320 / 360, 3)


def test_targets_say_met_and_missed() -> None:
    pipeline = _run([(50.0, 0.9), (90.0, 0.945)], total=500.0)
    careful = _run([(100.0, 0.85), (400.0, 0.9)], total=450.0)
    rows = {t["target"]: t for t in run.targets(pipeline, run.compare(pipeline, {"careful": careful}))}
    assert rows["final test accuracy"]["met"] is True
    assert rows["time to the careful recipe's best / its own time to it"]["measured"] == 0.125
    assert rows["time to the careful recipe's best / its own time to it"]["met"] is True
    assert rows["whole pipeline / careful recipe's training"]["met"] is False  # 500 s > 450 s


def test_markdown_lists_every_run_and_epoch() -> None:
    pipeline = _run(
        [(50.0, 0.86), (100.0, 0.91)],
        total=120.0,
        test_accuracy_after_head=0.86,
        stage_seconds={"ingest": 1.0},
        flip_tta={
            "val_plain": 0.9,
            "val_flip_tta": 0.92,
            "test_plain": 0.9,
            "test_flip_tta": 0.91,
            "keep": True,
            "kept_by_finetune": True,
        },
    )
    careful = _run([(20.0, 0.8), (60.0, 0.88)], total=70.0, test_accuracy_after_frozen=0.8)
    comparison = run.compare(pipeline, {"careful": careful})
    text = run.to_markdown(
        {
            "name": "x",
            "machine": "m",
            "source": "s",
            "split_counts": "8 train, 2 val, 100 test",
            "pipeline": pipeline,
            "baselines": {"careful": careful},
            "comparison": comparison,
            "targets": run.targets(pipeline, comparison),
        }
    )
    assert "| careful_best | 0.8800 | 100.0 | 60.0 | 1.667 |" in text
    assert text.count("| pipeline | p |") == 2 and text.count("| careful | p |") == 2
    assert "Better on val: yes" in text and "Kept by finetune" in text and "one view" in text
    assert "0.9100 on 100 test images: 95% interval 0.838-0.952" in text
    assert "| final test accuracy | >= 0.94 | 0.9100 | **no** |" in text


def test_wilson_interval_matches_the_textbook_value() -> None:
    low, high = run.wilson_interval(0.9, 100)
    assert round(low, 3) == 0.826 and round(high, 3) == 0.945
    assert run.wilson_interval(1.0, 23)[1] == 1.0 and run.wilson_interval(1.0, 23)[0] < 0.86
