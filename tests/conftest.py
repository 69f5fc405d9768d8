"""Shared fixtures: an offline, writable KERAS_HOME, tiny generated image folders, real subsets."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TP_SHARED_DIR", REPO.parent / "shared"))
FLOWERS = SHARED / "datasets" / "flower_photos"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera_data"
KERAS_SEED = SHARED / "keras" / "models"


def _offline_keras_home() -> Path:
    """A writable KERAS_HOME whose models/ links the seeded ImageNet weights (Keras writes keras.json there).

    Set here, at conftest import, because Keras reads KERAS_HOME once when it is first imported: a
    session fixture runs after the test modules (and Keras) are imported, too late for this process.
    """
    home = Path(tempfile.mkdtemp(prefix="tp_keras_home_"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    (home / "models").mkdir()
    if KERAS_SEED.is_dir():
        for weights in KERAS_SEED.iterdir():
            (home / "models" / weights.name).symlink_to(weights.resolve())
    os.environ["KERAS_HOME"] = str(home)
    return home


KERAS_HOME = _offline_keras_home()


def _one_core_per_test_process() -> None:
    """With as many xdist processes as cores (`make test`: 2 on 2), pin each process to a core of its own.

    TensorFlow, ONNX Runtime and the image loaders size their thread pools from the affinity mask
    (components.core.runtime.available_cores), and so do the stage processes a test starts (they inherit
    it): two test processes then run two pools on two cores, not four spinning pools fighting over them.
    Set here, before anything imports TensorFlow.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not worker.startswith("gw") or not count.isdigit() or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if int(count) == len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


_one_core_per_test_process()

import components  # noqa: E402, F401  (its package init switches telemetry off before anything else loads)

TRACKING_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


# Seconds each long module took in `make test` (2026-12-06, 2 cores, --durations): the order xdist hands
# modules out in. Stale or missing numbers cost only balance between the processes, never a result.
MODULE_SECONDS = {
    "integration/test_flow.py": 333,
    "integration/test_tracking_outage.py": 187,
    "unit/test_jax_backend.py": 48,
    "unit/test_finetune.py": 44,
    "integration/test_registry_server.py": 40,
    "unit/test_evaluate.py": 38,
    "unit/test_onnx_inference.py": 35,
    "unit/test_train_head.py": 29,
    "unit/test_validate.py": 25,
    "unit/test_infra_security.py": 22,
    "unit/test_backbones.py": 22,
    "integration/test_deployments.py": 19,
    "integration/test_faults.py": 18,
    "unit/test_flow_prefect.py": 16,
    "unit/test_drift.py": 16,
    "unit/test_scoring.py": 15,
    "integration/test_serving.py": 12,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, each kept whole and in order (longest-first scheduling): xdist
    (`--dist loadfile --no-loadscope-reorder`) hands them out at the start, and the short ones fill the
    gaps at the end instead of one process finishing a long module alone. Modules marked slow that the
    table does not know come next, then the rest as collected."""
    tests_dir = Path(__file__).resolve().parent
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}

    def order(item: pytest.Item) -> tuple[float, bool]:
        seconds = MODULE_SECONDS.get(Path(os.path.relpath(item.path, tests_dir)).as_posix(), 0)
        return -seconds, item.path not in slow_modules

    items.sort(key=order)  # a stable sort: modules stay whole


@pytest.fixture(autouse=True, scope="module")
def tracking_environment_per_module():
    """Each test module starts with the session's MLflow variables.

    `mlflow.set_tracking_uri` (every flow and stage calls it) also writes MLFLOW_TRACKING_URI into
    os.environ, so a module run earlier in the same xdist worker sent a later module's `dvc repro`
    subprocesses to its own store (a workspace's model registered elsewhere, seen in CI).
    """
    import mlflow

    saved = {name: os.environ.get(name) for name in TRACKING_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # the process-global one too (None: MLflow's default)


@pytest.fixture(scope="session")
def keras_home() -> Path:
    """The offline KERAS_HOME this session uses (for tests that start subprocesses)."""
    return KERAS_HOME


def write_image(
    path: Path,
    size: tuple[int, int] = (48, 40),
    color: tuple[int, int, int] = (200, 30, 30),
    seed: int = 0,
    fmt: str = "JPEG",
    mode: str = "RGB",
) -> Path:
    """A small image: a class colour plus noise, so every file has distinct bytes."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.clip(np.array(color)[None, None, :] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A source folder of 2 classes x 24 tiny JPEGs, learnable by colour."""
    root = tmp_path / "source"
    for c, name in enumerate(["alpha", "beta"]):
        for i in range(24):
            write_image(root / name / f"{name}_{i:03d}.jpg", color=COLORS[c], seed=c * 1000 + i)
    return root


def copy_subset(class_dir: Path, dest: Path, count: int) -> Path:
    """The first `count` files (sorted) of one class folder of a real data set."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in class_dir.iterdir() if p.is_file())[:count]:
        shutil.copy2(f, dest / f.name)
    return dest


@pytest.fixture
def flowers_subset(tmp_path: Path) -> Path:
    """2 real flower classes x 20 images (skipped where the shared data set is absent)."""
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} not found (set TP_SHARED_DIR)")
    root = tmp_path / "flowers"
    for name in ["daisy", "sunflowers"]:
        copy_subset(FLOWERS / name, root / name, 20)
    return root
