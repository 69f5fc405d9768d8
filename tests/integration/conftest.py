"""Integration fixtures: tiny settings for a real pipeline run in a throwaway workspace."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from benchmarks.workspace import deep_update, make_workspace
from tests.conftest import FLOWERS, copy_subset
from tests.evalkit import migrated_store

# Small enough to train in about a minute on 2 cores, real enough to learn something.
TINY_SETTINGS = {
    # 112 px has no weights file of its own, so Keras takes the seeded 224 one (96/128/160/192 would download).
    "model": {"alpha": 0.35, "image_size": 112},
    "ingest": {"split": {"train": 0.5, "val": 0.25, "test": 0.25}},
    # Embedding near-duplicates off: a backbone pass in every validate would cost each integration test;
    # tests/unit/test_near_duplicate_embeddings.py runs it.
    "validate": {"min_images_per_class": 3, "max_bad_fraction": 0.2, "near_duplicates": {"embeddings": False}},
    "augment": {"preview_images": 4},
    "train_head": {  # min_epoch_steps 1: an epoch is one pass, as the tiny runs were timed with
        "epochs": 30,
        "batch_size": 16,
        "augmented_copies": 1,
        "early_stopping_patience": 8,
        "min_epoch_steps": 1,
    },
    # ~17 val images cannot show any gain beyond noise, so the default would always keep the barely trained head
    # (0.53 on val); the flows are what these tests check, and at this size fine-tuning is what learns.
    "finetune": {
        "epochs": 1,
        "batch_size": 16,
        "unfreeze_layers": 10,
        "warmup_epochs": 0,
        "keep_head_if_not_better": False,
    },
    "evaluate": {"batch_size": 16, "worst_examples": 4, "promotion": {"min_accuracy": 0.0}},
    "orchestration": {"workspace_wait_s": 0},  # a run that finds the workspace busy fails at once, not after hours
}


def make_tiny_workspace(root: Path, source: Path, **settings: dict) -> Path:
    """The project in its own git + DVC repository, with tiny settings pointing at `source`, and its SQLite
    tracking store (tracking.uri's mlflow.db) already holding MLflow's tables (tests.evalkit.migrated_store)."""
    workspace = make_workspace(root, source, deep_update(copy.deepcopy(TINY_SETTINGS), settings))
    migrated_store(workspace / "mlflow.db")
    return workspace


@pytest.fixture(scope="module")
def flowers_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} not found (set TP_SHARED_DIR)")
    root = tmp_path_factory.mktemp("flowers_source")
    for name in ["daisy", "sunflowers"]:
        copy_subset(FLOWERS / name, root / name, 30)
    return root
