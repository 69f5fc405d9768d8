"""Tiny inputs for the augment/data/train_head/finetune tests: a manifest of colour-coded JPEGs,
a saved augmentation policy, and params for a 64 px MobileNetV2 (alpha 0.35) that trains in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from components.core.config import Params, parse_params
from components.core.paths import TrainHeadPaths
from tests.conftest import COLORS, write_image
from tests.evalkit import migrated_store

CLASSES = ["alpha", "beta"]
SPLIT_OF = ["train"] * 8 + ["val"] * 2 + ["test"] * 2  # 12 images per class


def write_manifest(root: Path, classes: list[str] = CLASSES) -> Path:
    """12 JPEGs per class (8 train, 2 val, 2 test) of assorted sizes, none of them 64 px square."""
    rows = []
    for c, name in enumerate(classes):
        for i, split in enumerate(SPLIT_OF):
            size = (70 + 3 * i, 60 + 2 * i)
            path = write_image(
                root / "raw" / name / f"{name}_{i:02d}.jpg", size=size, color=COLORS[c], seed=100 * c + i
            )
            rows.append(
                {
                    "path": str(path),
                    "label": name,
                    "split": split,
                    "sha256": f"{c}{i:063d}",
                    "bytes": path.stat().st_size,
                    "width": size[0],
                    "height": size[1],
                    "format": "JPEG",
                    "mode": "RGB",
                    "source": str(path),
                    "error": "",
                }
            )
    manifest = root / "validated.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def tiny_params(**sections: dict[str, Any]) -> Params:
    """Params for tests: 64 px MobileNetV2 alpha 0.35 (ImageNet weights from the seeded KERAS_HOME)."""
    raw: dict[str, Any] = {
        "project": {"seed": 7},
        "model": {"backbone": "mobilenet_v2", "alpha": 0.35, "image_size": 64, "weights": "imagenet"},
        # min_epoch_steps 1: an epoch is one pass (tests check behaviour, not how far a head learns on a dozen images)
        "train_head": {
            "batch_size": 8,
            "epochs": 2,
            "augmented_copies": 1,
            "early_stopping_patience": 2,
            "min_epoch_steps": 1,
        },
        "finetune": {"batch_size": 8, "epochs": 1, "unfreeze_layers": 20, "warmup_epochs": 0},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_params(raw, source="test params")


def write_policy(path: Path, policy: list[dict[str, dict[str, Any]]] | None = None, seed: int = 7) -> Path:
    from components.modeling.transforms import build_pipeline, save_pipeline

    if policy is None:
        policy = [{"HorizontalFlip": {"p": 0.5}}, {"RandomBrightnessContrast": {"p": 0.8}}]
    save_pipeline(build_pipeline(policy, seed), path)
    return path


def head_paths(
    root: Path,
    manifest: Path,
    policy: Path,
    out: str = "models/head",
    reports: str = "reports/train_head",
    cache: str = "cache",
) -> TrainHeadPaths:
    """train_head's paths in a test workspace: everything under `root`."""
    return TrainHeadPaths(
        manifest=manifest, policy=policy, out_dir=root / out, report_dir=root / reports, cache_dir=root / cache
    )


def train_tiny_head(root: Path, params: Params | None = None) -> dict[str, Any]:
    """Train a head once on the tiny manifest in `root`, tracking into `root/mlflow.db`."""
    import pytest

    from components.train_head import run_train_head

    manifest = write_manifest(root)
    policy = write_policy(root / "policy.json")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", migrated_store(root / "mlflow.db"))
    mp.chdir(root)
    try:
        result = run_train_head(params or tiny_params(), head_paths(root, manifest, policy))
    finally:
        mp.undo()
    return {"root": root, "manifest": manifest, "policy": policy, "result": result}
