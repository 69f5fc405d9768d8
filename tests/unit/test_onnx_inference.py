"""ONNX Runtime for frozen passes: same outputs as Keras (max abs diff <= 1e-4 on features, 1e-5 on
probabilities), one export per model reused from the cache, and Keras whenever ONNX cannot run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.core.config import ModelConfig
from components.core.stage_config import TrainHeadConfig
from components.modeling import frozen_forward, onnx_inference
from components.modeling.backbones import build_classifier, feature_extractor
from tests.conftest import COLORS, write_image

pytestmark = pytest.mark.slow  # exports models to ONNX: `make test` runs it, `make test-fast` does not

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

FEATURE_TOLERANCE = 1e-4  # pooled MobileNetV2 features lie in 0..6
PROBABILITY_TOLERANCE = 1e-5


def tiny_classifier() -> Any:
    model, _ = build_classifier(
        ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=64, weights="imagenet"), 3, TrainHeadConfig()
    )
    return model


@pytest.fixture(scope="module")
def classifier() -> Any:
    return tiny_classifier()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_cache")


def images(n: int, height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, height, width, 3)).astype(np.float32)


def test_features_and_probabilities_match_keras(classifier: Any, cache_dir: Path) -> None:
    extractor = feature_extractor(classifier)
    runner = frozen_forward.FrozenRunner(extractor, cache_dir=cache_dir, engine="auto")
    assert runner.engine == "onnxruntime", runner.reason
    x = images(11)
    features = runner.predict(x, batch_size=4)  # 3 batches, the last one short
    expected = extractor.predict(x, verbose=0)
    assert features.shape == expected.shape == (11, 1280) and features.dtype == np.float32
    assert np.max(np.abs(features - expected)) <= FEATURE_TOLERANCE
    assert runner.export is not None and runner.export.max_abs_diff <= FEATURE_TOLERANCE

    # The whole classifier takes images of any size (it resizes inside): so does its ONNX file.
    probs_runner = frozen_forward.FrozenRunner(classifier, cache_dir=cache_dir)
    odd = images(5, height=70, width=50, seed=1)
    probs = probs_runner.predict(odd)
    assert np.max(np.abs(probs - classifier.predict(odd, verbose=0))) <= PROBABILITY_TOLERANCE
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_tta_model_matches_keras_and_gets_its_own_export(classifier: Any, cache_dir: Path) -> None:
    from components.modeling.backbones import with_flip_tta

    tta = with_flip_tta(classifier, crop=True)  # every TTA layer: the mirror, the central crop, the mean
    assert onnx_inference.model_cache_key(tta) != onnx_inference.model_cache_key(classifier)
    runner = frozen_forward.FrozenRunner(tta, cache_dir=cache_dir, engine="auto")
    assert runner.engine == "onnxruntime", runner.reason
    odd = images(5, height=70, width=50, seed=2)
    probs = runner.predict(odd)
    assert np.max(np.abs(probs - tta.predict(odd, verbose=0))) <= PROBABILITY_TOLERANCE
    assert np.max(np.abs(probs - classifier.predict(odd, verbose=0))) > PROBABILITY_TOLERANCE  # both views count


def test_runs_the_projects_tf_data_batches_in_order(classifier: Any, cache_dir: Path, tmp_path: Path) -> None:
    """What train_head/evaluate pass: image_batches() over files, in the given order."""
    from components.modeling.data import image_batches

    paths = [
        str(write_image(tmp_path / f"img_{i}.jpg", size=(60 + i, 50), color=COLORS[i % 4], seed=i)) for i in range(7)
    ]
    extractor = feature_extractor(classifier)
    runner = frozen_forward.FrozenRunner(extractor, cache_dir=cache_dir)
    got = runner.predict(image_batches(paths, 64, 3))
    expected = extractor.predict(image_batches(paths, 64, 3), verbose=0)
    assert got.shape == (7, 1280) and np.max(np.abs(got - expected)) <= FEATURE_TOLERANCE
    # (x, y) pairs work too: the labels are dropped.
    pairs = [(got_batch, np.zeros(len(got_batch))) for got_batch in np.array_split(images(6), 2)]
    assert runner.predict(pairs).shape == (6, 1280)


def test_export_is_cached_by_content(classifier: Any, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extractor = feature_extractor(classifier)
    first = onnx_inference.export_onnx(extractor, cache_dir)
    # The same model built again in this process (new auto-generated layer names) reuses the file ...
    rebuilt = feature_extractor(tiny_classifier())
    assert onnx_inference.model_fingerprint(rebuilt) == onnx_inference.model_fingerprint(extractor)

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("exported again although the cache holds this model")

    monkeypatch.setattr(onnx_inference, "_export_to", no_export)
    again = onnx_inference.export_onnx(rebuilt, cache_dir)
    assert again.path == first.path and again.key == first.key
    assert frozen_forward.FrozenRunner(rebuilt, cache_dir=cache_dir).engine == "onnxruntime"
    monkeypatch.undo()

    # ... a changed weight does not, and neither does a torn file.
    changed = feature_extractor(tiny_classifier())
    kernel = changed.get_layer("backbone").get_layer("Conv1").kernel
    kernel.assign(kernel.numpy() * 1.01)
    assert onnx_inference.model_fingerprint(changed) != onnx_inference.model_fingerprint(extractor)
    first.path.write_bytes(first.path.read_bytes()[:1000])
    repaired = onnx_inference.export_onnx(extractor, cache_dir)
    assert repaired.path == first.path and repaired.accepted and repaired.path.stat().st_size > 1000


def test_falls_back_to_keras_without_onnxruntime(
    classifier: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert not onnx_inference.onnxruntime_available()
    extractor = feature_extractor(classifier)
    runner = frozen_forward.FrozenRunner(extractor, cache_dir=tmp_path / "onnx")
    assert runner.engine == "keras" and "not installed" in runner.reason
    x = images(5, seed=2)
    expected = extractor.predict(x, verbose=0)
    np.testing.assert_allclose(runner.predict(x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        frozen_forward.frozen_predict(extractor, [x[:2], x[2:]], cache_dir=tmp_path), expected, rtol=1e-5, atol=1e-5
    )
    assert not (tmp_path / "onnx").exists() or not list((tmp_path / "onnx").glob("*.onnx"))
    with pytest.raises(RuntimeError, match="onnxruntime was requested"):
        frozen_forward.FrozenRunner(extractor, cache_dir=tmp_path / "onnx", engine="onnxruntime")


def test_an_export_that_disagrees_with_keras_is_not_used(classifier: Any, tmp_path: Path) -> None:
    extractor = feature_extractor(classifier)
    runner = frozen_forward.FrozenRunner(extractor, cache_dir=tmp_path, tolerance=0.0)  # ONNX is never bit-exact here
    assert runner.engine == "keras" and "differs from Keras" in runner.reason
    assert runner.export is not None and not runner.export.accepted and runner.export.max_abs_diff > 0
    with pytest.raises(ValueError, match="engine"):
        frozen_forward.FrozenRunner(extractor, engine="tensorrt")  # type: ignore[arg-type]
