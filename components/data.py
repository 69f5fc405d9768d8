"""Reading the validated manifest and turning a split into a tf.data pipeline.

Shared by train_head, finetune and evaluate. Images are decoded with Pillow (it handles
grayscale, palette, alpha, 16-bit and CMYK files that validate let through) and resized to the
model's square input; the model itself carries the backbone's normalisation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "label", "split", "sha256", "bytes", "width", "height", "format", "mode", "source", "error"]


@dataclass(frozen=True)
class Split:
    paths: list[str]
    labels: np.ndarray  # int32 class indices into `classes`
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def read_manifest(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"label": str, "split": str, "sha256": str}, keep_default_na=False)
    missing = {"path", "label", "split"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    return frame


def class_names(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["label"].unique().tolist())


def load_split(manifest: str | Path | pd.DataFrame, split: str, classes: list[str] | None = None) -> Split:
    """Paths and integer labels of one split, with classes in sorted order unless given."""
    frame = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    classes = classes or class_names(frame)
    index = {name: i for i, name in enumerate(classes)}
    rows = frame[frame["split"] == split]
    unknown = set(rows["label"]) - set(index)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the model's classes {classes}")
    labels = rows["label"].map(index).to_numpy(dtype=np.int32)
    return Split(rows["path"].tolist(), labels, list(classes))


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale ('I;16', 'I') scaled to 8 bits: Pillow's convert('RGB') would clip it to 255 instead."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        return img
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8), "L")


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode any Pillow-readable image to a (size, size, 3) uint8 RGB array."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger than needed
        img = _to_8bit(img).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


# --- tf.data input pipelines --------------------------------------------------------------------
# Decoding (Pillow) and augmentation (albumentations) run as Python inside tf.data's parallel
# map: both release the GIL for the heavy work, so AUTOTUNE threads overlap them with training.
# Each worker thread loads the saved augmentation pipeline once and re-seeds it per image from a
# seed that tf.data draws in a fixed order, so augmentation is reproducible however the threads
# are scheduled (a shared pipeline's random state would depend on which thread ran first).

# Keyed by OS thread id, not threading.local: TF calls Python from its own threads with a fresh
# Python thread state each time, which would wipe thread-local data after every image.
_WORKER_PIPELINES: dict[tuple[int, str], Any] = {}
_WORKER_LOCK = threading.Lock()


def worker_pipeline(policy_path: str) -> Any:
    """This worker thread's copy of the saved augmentation pipeline, loaded on its first image only."""
    key = (threading.get_ident(), policy_path)
    pipeline = _WORKER_PIPELINES.get(key)
    if pipeline is None:
        from components import augment  # late: augment imports this module

        pipeline = augment.load_pipeline(policy_path, seed=0)
        with _WORKER_LOCK:
            _WORKER_PIPELINES[key] = pipeline
    return pipeline


def augment_image(image: np.ndarray, policy_path: str, image_seed: int) -> np.ndarray:
    """Apply the saved pipeline with a per-image seed; keep the input's size for batching."""
    pipeline = worker_pipeline(policy_path)
    pipeline.set_random_seed(int(image_seed) % 2**32)
    out = pipeline(image=image)["image"]
    if out.shape != image.shape:  # a crop or pad changed the size
        out = np.asarray(Image.fromarray(out).resize(image.shape[1::-1], Image.Resampling.BILINEAR))
    return out


def _numpy_op(fn: Any, args: list[Any], image_size: int) -> Any:
    """Run a numpy image function inside tf.data, with the static shape Keras needs."""
    import tensorflow as tf

    image = tf.numpy_function(fn, args, tf.uint8, stateful=False)
    image.set_shape((image_size, image_size, 3))
    return image


def _image_ops(image_size: int, policy_path: str | None) -> tuple[Any, Any, Any]:
    """tf.data functions: path -> image, (image, seed) -> augmented, (path, seed) -> augmented."""

    def decode(path: bytes) -> np.ndarray:
        return load_rgb(path.decode(), image_size)

    def augment(image: np.ndarray, image_seed: np.int64) -> np.ndarray:
        return augment_image(image, policy_path, image_seed)

    def decode_augment(path: bytes, image_seed: np.int64) -> np.ndarray:
        return augment(decode(path), image_seed)  # one Python hop per image instead of two

    return (lambda p: _numpy_op(decode, [p], image_size),
            lambda img, s: _numpy_op(augment, [img, s], image_size),
            lambda p, s: _numpy_op(decode_augment, [p, s], image_size))


def make_dataset(split: Split, image_size: int, batch_size: int, *, policy_path: str | Path | None = None,
                 training: bool = False, seed: int = 0, cache: bool = False) -> Any:
    """Batches of (float32 images in 0..255, int32 labels) for one split.

    training=True shuffles each epoch and, with a `policy_path`, augments; training=False never
    augments (val/test must be scored on the images as they are). cache=True keeps decoded
    images in memory, before augmentation, so every epoch still sees fresh augmentations.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    decode, augment, decode_augment = _image_ops(image_size, str(policy_path) if policy_path else None)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(split.paths, tf.string),
                                             tf.constant(split.labels, tf.int32)))
    if cache:
        ds = ds.map(lambda p, y: (decode(p), y), num_parallel_calls=autotune).cache()
    if training:
        ds = ds.shuffle(min(len(split), 4096) if cache else len(split), seed=seed, reshuffle_each_iteration=True)
    if training and policy_path is not None:
        # Per-image seeds drawn in element order: reproducible, and new ones every epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        prepare = augment if cache else decode_augment
        ds = tf.data.Dataset.zip((ds, seeds)).map(lambda item, s: (prepare(item[0], s), item[1]),
                                                  num_parallel_calls=autotune)
    elif not cache:
        ds = ds.map(lambda p, y: (decode(p), y), num_parallel_calls=autotune)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    return ds.batch(batch_size).prefetch(autotune)


def image_batches(paths: list[str], image_size: int, batch_size: int, *, policy_path: str | Path | None = None,
                  seeds: np.ndarray | None = None) -> Any:
    """float32 image batches in the given order (for feature extraction), augmented with `seeds` if given."""
    import tensorflow as tf

    decode, _, decode_augment = _image_ops(image_size, str(policy_path) if policy_path else None)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    if seeds is None:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64))))
        ds = ds.map(decode_augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda x: tf.cast(x, tf.float32)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
