"""The tf.data input pipeline: what training sees, and what validation and test never do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.modeling.data import load_rgb, load_split, make_dataset
from tests.modelkit import write_manifest, write_policy

# Inverting every image: impossible to miss if it ever reaches val/test.
INVERT = [{"InvertImg": {"p": 1.0}}]


def _batches(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path)


@pytest.mark.parametrize("split", ["val", "test"])
def test_validation_and_test_images_are_never_augmented(manifest: Path, tmp_path: Path, split: str):
    policy = write_policy(tmp_path / "invert.json", INVERT)
    data = load_split(manifest, split)
    images, labels = _batches(make_dataset(data, 64, 3, policy_path=policy, training=False, seed=1))
    expected = np.stack([load_rgb(p, 64) for p in data.paths]).astype(np.float32)
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, data.labels)
    # the same policy does reach training images
    train_images, _ = _batches(make_dataset(load_split(manifest, "train"), 64, 4, policy_path=policy, training=True))
    assert train_images.mean() > 255 - expected.mean() - 20


def test_batches_are_float32_pixels_in_0_255_with_integer_labels(manifest: Path):
    data = load_split(manifest, "train")
    images, labels = _batches(make_dataset(data, 64, 5, training=True, seed=0))
    assert images.shape == (len(data), 64, 64, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255 and images.max() > 1  # not rescaled to 0..1
    assert labels.dtype == np.int32 and sorted(labels.tolist()) == sorted(data.labels.tolist())


@pytest.mark.parametrize("cache", [False, True])
def test_training_augmentation_is_reproducible_for_a_seed_and_fresh_each_epoch(
    manifest: Path, tmp_path: Path, cache: bool
):
    policy = write_policy(tmp_path / "policy.json")
    data = load_split(manifest, "train")
    ds = make_dataset(data, 64, 4, policy_path=policy, training=True, seed=11, cache=cache)
    epoch1, epoch2 = _batches(ds)[0], _batches(ds)[0]
    rerun = _batches(make_dataset(data, 64, 4, policy_path=policy, training=True, seed=11, cache=cache))[0]
    np.testing.assert_array_equal(epoch1, rerun)
    assert not np.array_equal(epoch1, epoch2)


def test_augmentation_pipeline_is_loaded_once_per_worker_not_per_image(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from components.modeling import transforms

    loads = []
    real_load = transforms.load_pipeline
    monkeypatch.setattr(transforms, "load_pipeline", lambda path, seed: loads.append(path) or real_load(path, seed))
    policy = write_policy(tmp_path / "fresh-policy.json")
    data = load_split(manifest, "train")
    ds = make_dataset(data, 64, 2, policy_path=policy, training=True, seed=0)
    for _ in range(3):
        _batches(ds)
    assert 1 <= len(loads) < len(data)  # 48 images augmented; loaded by at most a few worker threads


def test_16_bit_grayscale_keeps_its_brightness(tmp_path):
    from PIL import Image

    from components.modeling.data import load_rgb

    mid_grey = np.full((40, 48), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    path = tmp_path / "grey16.png"
    Image.fromarray(mid_grey).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = load_rgb(path, 32)
    assert pixels.shape == (32, 32, 3) and abs(int(pixels.mean()) - 128) <= 1


# --- the keras.utils.PyDataset input (backends other than TensorFlow) -----------------------------


def _all(batches) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[batches[i] for i in range(len(batches))])
    return np.concatenate(xs), np.concatenate(ys)


def test_pydataset_batches_are_the_tf_data_images_with_one_hot_labels(manifest: Path):
    from components.modeling.data import ImageBatches

    data = load_split(manifest, "val")  # 4 images: batches of 3 and 1
    batches = ImageBatches(data, 64, 3, cache=True)
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (3, 64, 64, 3) and x.dtype == np.float32 and y.shape == (3, 2) and y.dtype == np.float32
    images, labels = _all(batches)
    np.testing.assert_array_equal(labels, np.eye(2, dtype=np.float32)[data.labels])  # in order: eval never shuffles
    np.testing.assert_array_equal(images, _batches(make_dataset(data, 64, 3))[0])  # the same decoder as tf.data
    np.testing.assert_array_equal(_all(batches)[0], images)  # from the cache: unchanged
    (only_images,) = ImageBatches(data.paths, 64, 8)[0]  # paths alone: images for predict, no labels
    np.testing.assert_array_equal(only_images, images)


def test_pydataset_augments_training_batches_only(manifest: Path, tmp_path: Path):
    from components.modeling.data import ImageBatches

    policy = write_policy(tmp_path / "invert.json", INVERT)
    data = load_split(manifest, "train")
    plain = np.stack([load_rgb(p, 64) for p in data.paths]).astype(np.float32)
    evaluated, _ = _all(ImageBatches(data, 64, 5, policy_path=policy, training=False))
    np.testing.assert_array_equal(evaluated, plain)
    batches = ImageBatches(data, 64, 5, policy_path=policy, training=True, seed=3)
    trained, labels = _all(batches)
    order = batches.order(0)
    assert sorted(order.tolist()) == list(range(len(data))) and order.tolist() != list(range(len(data)))
    np.testing.assert_array_equal(trained, 255 - plain[order])  # shuffled, and every image inverted
    np.testing.assert_array_equal(labels.argmax(1), data.labels[order])


def test_pydataset_augmentation_is_reproducible_for_a_seed_and_fresh_each_epoch(manifest: Path, tmp_path: Path):
    from components.modeling.data import ImageBatches

    policy = write_policy(tmp_path / "policy.json")
    data = load_split(manifest, "train")
    batches = ImageBatches(data, 64, 4, policy_path=policy, training=True, seed=11)
    epoch1 = _all(batches)[0]
    batches.on_epoch_end()  # what Keras calls after each epoch
    epoch2 = _all(batches)[0]
    rerun = ImageBatches(data, 64, 4, policy_path=policy, training=True, seed=11, workers=1)
    np.testing.assert_array_equal(_all(rerun)[0], epoch1)
    assert not np.array_equal(epoch1, epoch2)
    rerun.epoch = 1  # what finetune's epoch callback sets when a run resumes at its second epoch
    np.testing.assert_array_equal(_all(rerun)[0], epoch2)


def test_tf_data_on_tensorflow_and_the_pydataset_on_other_backends(manifest: Path, monkeypatch: pytest.MonkeyPatch):
    from components.modeling import data as data_module
    from components.modeling.data import ImageBatches, image_batches, labelled_batches

    data = load_split(manifest, "val")
    on_tf = labelled_batches(data, 64, 3)
    assert data_module.uses_tf_data() and not isinstance(on_tf, ImageBatches)
    _, labels = _batches(on_tf)
    np.testing.assert_array_equal(labels, np.eye(2, dtype=np.float32)[data.labels])
    monkeypatch.setattr(data_module, "uses_tf_data", lambda: False)
    assert isinstance(labelled_batches(data, 64, 3), ImageBatches)
    assert isinstance(image_batches(data.paths, 64, 3), ImageBatches)


# --- EXIF orientation: both input pipelines see what the loader returns, upright ------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_both_input_pipelines_see_every_exif_orientation_upright(tmp_path: Path, fmt: str):
    from components.modeling.data import ImageBatches, Split, load_rgb
    from tests.datakit import assert_upright, save_encoded, upright_picture, write_oriented_images

    oriented = write_oriented_images(tmp_path, fmt)
    split = Split([str(p) for p in oriented.values()], np.zeros(len(oriented), dtype=np.int32), ["only"])
    reference = load_rgb(save_encoded(upright_picture(), tmp_path / f"plain.{fmt}", fmt), 32)
    tf_data, _ = _batches(make_dataset(split, 32, 3))  # TensorFlow decodes nothing: the loader runs inside
    py_dataset, _ = _all(ImageBatches(split, 32, 3))
    for i, path in enumerate(split.paths):
        pixels = load_rgb(path, 32)
        assert_upright(pixels, reference, tolerance=8 if fmt == "JPEG" else 0)
        np.testing.assert_array_equal(tf_data[i], pixels.astype(np.float32))
        np.testing.assert_array_equal(py_dataset[i], pixels.astype(np.float32))
