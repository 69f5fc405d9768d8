"""Preflight: settings that would only fail deep inside a stage are refused up front, by key."""

from __future__ import annotations

from pathlib import Path

from components.core.config import load_params
from components.preflight import check_params, main

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.alpha=0.35", "model.image_size=64"]


def problems_for(*overrides: str) -> list[str]:
    return check_params(load_params(REPO / "params.yaml", [*SMALL, *overrides]))


def test_shipped_settings_pass_preflight():
    assert problems_for() == []


def test_unfreeze_point_beyond_the_backbone_is_named():
    problems = problems_for("finetune.unfreeze_layers=5000")
    assert len(problems) == 1 and "finetune.unfreeze_layers = 5000" in problems[0]


def test_unknown_unfreeze_layer_name_is_named():
    (problem,) = problems_for("finetune.unfreeze_from=block_99_expand")
    assert "finetune.unfreeze_from" in problem


def test_alpha_without_published_weights_is_refused():
    (problem,) = problems_for("model.alpha=0.6")
    assert "alpha" in problem and "0.35" in problem


def test_unknown_backbone_and_transform_are_reported_together():
    problems = problems_for("model.backbone=mobilenet_v9", "augment.policy=[{HorizontalFlp: {p: 0.5}}]")
    assert any("model.backbone" in p for p in problems)
    assert any("augment.policy[0]" in p and "HorizontalFlip" in p for p in problems)


def test_cli_exits_2_with_readable_message(capsys):
    code = main(
        [
            "--params",
            str(REPO / "params.yaml"),
            *sum((["--set", o] for o in SMALL), []),
            "--set",
            "augment.policy=[{Affine: {rotat: 10}}]",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "augment.policy[0]" in err and "Traceback" not in err
