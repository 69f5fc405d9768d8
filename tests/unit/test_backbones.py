"""The backbone registry and the classifier contract every saved model keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.core.config import ModelConfig, ParamsError
from components.core.stage_config import TrainHeadConfig


def test_unknown_backbone_error_names_the_key_and_the_allowed_values():
    from components.modeling.backbones import BACKBONES, build_classifier

    with pytest.raises(ParamsError) as err:
        build_classifier(ModelConfig(backbone="mobilenet_v9"), 2, TrainHeadConfig())
    message = str(err.value)
    assert "model.backbone" in message and "mobilenet_v9" in message
    assert all(key in message for key in BACKBONES)


def test_missing_weights_file_names_model_weights(tmp_path: Path):
    from components.modeling.backbones import build_backbone

    with pytest.raises(ParamsError, match="model.weights"):
        build_backbone(ModelConfig(alpha=0.35, image_size=64, weights=str(tmp_path / "absent.h5")))


def test_saved_model_loads_in_safe_mode_and_takes_raw_images_of_another_size(tmp_path: Path):
    import keras

    from components.modeling.backbones import build_classifier

    model, _ = build_classifier(ModelConfig(alpha=0.35, image_size=64, weights="imagenet"), 3, TrainHeadConfig())
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")  # safe_mode=True is the default

    raw = np.random.default_rng(0).uniform(0, 255, (2, 90, 120, 3)).astype("float32")
    probs = loaded.predict(raw, verbose=0)
    assert probs.shape == (2, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, model.predict(raw, verbose=0), atol=1e-6)


def test_flip_tta_model_is_the_mean_over_the_mirror_and_keeps_the_single_view_model_inside(tmp_path: Path):
    from components.modeling.backbones import (
        build_classifier,
        feature_extractor,
        flip_views,
        plain_classifier,
        uses_flip_tta,
        with_flip_tta,
    )
    from components.modeling.model_folder import load_keras_model

    model, _ = build_classifier(ModelConfig(alpha=0.35, image_size=64, weights="imagenet"), 3, TrainHeadConfig())
    tta = with_flip_tta(model)
    tta.save(tmp_path / "tta.keras")
    loaded = load_keras_model(tmp_path / "tta.keras")  # safe mode: HorizontalFlip is a registered layer

    raw = np.random.default_rng(2).uniform(0, 255, (3, 48, 80, 3)).astype("float32")  # not mirror-symmetric
    plain, mirrored = model.predict(raw, verbose=0), model.predict(raw[:, :, ::-1], verbose=0)
    assert np.max(np.abs(plain - mirrored)) > 1e-4  # the mirror really is another view
    np.testing.assert_allclose(loaded.predict(raw, verbose=0), (plain + mirrored) / 2, atol=1e-6)
    views = flip_views(model).predict(raw, verbose=0)
    np.testing.assert_allclose(views[0], plain, atol=1e-6)
    np.testing.assert_allclose(views[1], mirrored, atol=1e-6)

    assert uses_flip_tta(loaded) and not uses_flip_tta(model)
    single = plain_classifier(loaded)
    assert plain_classifier(model) is model and single.get_layer("backbone") is not None
    np.testing.assert_allclose(single.predict(raw, verbose=0), plain, atol=1e-6)
    np.testing.assert_allclose(
        feature_extractor(loaded).predict(raw, verbose=0), feature_extractor(model).predict(raw, verbose=0), atol=1e-5
    )

    # finetune scores two weight sets through one views model (model_choice.views_scorer): it sees each one.
    from components.modeling.model_choice import views_scorer

    score = views_scorer(model)
    before = score(raw)
    model.set_weights([w * 0.5 if w.ndim == 2 else w for w in model.get_weights()])  # the dense kernel
    after = score(raw)
    assert np.max(np.abs(after - before)) > 1e-4
    np.testing.assert_allclose(after[0], model.predict(raw, verbose=0), atol=1e-6)
    np.testing.assert_allclose(after[1], model.predict(raw[:, :, ::-1], verbose=0), atol=1e-6)


def test_crop_tta_model_also_averages_the_central_crop_and_its_mirror(tmp_path: Path):
    import tensorflow as tf

    from components.modeling.backbones import (
        CROP_FRACTION,
        CentralCrop,
        build_classifier,
        plain_classifier,
        uses_crop_tta,
        uses_flip_tta,
        with_flip_tta,
    )
    from components.modeling.model_folder import load_keras_model

    raw = np.random.default_rng(3).uniform(0, 255, (2, 48, 80, 3)).astype("float32")
    cropped = tf.image.central_crop(raw, CROP_FRACTION).numpy()  # the crop the lever was measured with
    np.testing.assert_array_equal(CentralCrop(CROP_FRACTION)(raw), cropped)
    dynamic = tf.function(CentralCrop(CROP_FRACTION).call, input_signature=[tf.TensorSpec([None, None, None, 3])])
    np.testing.assert_array_equal(dynamic(raw), cropped)  # a saved model's input has no fixed size

    model, _ = build_classifier(ModelConfig(alpha=0.35, image_size=64, weights="imagenet"), 3, TrainHeadConfig())
    with_flip_tta(model, crop=True).save(tmp_path / "crops.keras")
    loaded = load_keras_model(tmp_path / "crops.keras")  # safe mode: CentralCrop is a registered layer
    views = [raw, raw[:, :, ::-1], cropped, cropped[:, :, ::-1]]
    expected = np.mean([model.predict(view, verbose=0) for view in views], axis=0)
    np.testing.assert_allclose(loaded.predict(raw, verbose=0), expected, atol=1e-6)
    assert uses_crop_tta(loaded) and uses_flip_tta(loaded) and not uses_crop_tta(with_flip_tta(model))
    np.testing.assert_allclose(
        plain_classifier(loaded).predict(raw, verbose=0), model.predict(raw, verbose=0), atol=1e-6
    )


def test_resnet_caffe_layer_matches_keras_preprocess_input_and_survives_saving(tmp_path: Path):
    import keras

    from components.modeling.backbones import CaffePreprocess

    images = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = keras.applications.resnet50.preprocess_input(images.copy())
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, CaffePreprocess()(inputs))
    model.save(tmp_path / "caffe.keras")
    reloaded = keras.models.load_model(tmp_path / "caffe.keras")
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mobilenet", "efficientnet_v2_b0", "resnet50", "convnext_tiny"])
def test_every_registered_backbone_builds_a_classifier(backbone: str):
    from components.modeling.backbones import build_classifier

    alpha = 0.25 if backbone == "mobilenet" else None
    model, base = build_classifier(
        ModelConfig(backbone=backbone, alpha=alpha, image_size=32, weights="none"), 4, TrainHeadConfig(hidden_units=8)
    )
    probs = model.predict(np.zeros((1, 40, 40, 3), "float32"), verbose=0)
    assert probs.shape == (1, 4)
    assert not base.trainable
