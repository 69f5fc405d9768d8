"""Manifests into splits, and the input pipelines that decode (and augment) their images in batches.

Shared by train_head, finetune, evaluate, export and batch prediction (the model folders they hand on:
`components.modeling.model_folder`). Images are decoded with Pillow (it handles grayscale, palette, alpha, 16-bit
and CMYK files that validate let through) and resized to the model's square input; the model itself
carries the backbone's normalisation.

Two input pipelines share one decoder (`load_rgb`) and one augmentation function (`augment_image`):
tf.data (`make_dataset`, `image_batches`) where TensorFlow is the Keras backend (faster there), and a
`keras.utils.PyDataset` (`ImageBatches`) that needs no TensorFlow, for other backends (JAX on GPU
workers). `labelled_batches` and `image_batches` pick one by `keras.config.backend()`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import pandas as pd

from components.core import runtime
from components.core.contracts import read_manifest
from components.core.stage_config import ValidateConfig
from components.ingestion.images import ImageLimits, decode_rgb
from components.modeling.image_augment import augment_image


@dataclass(frozen=True)
class Split:
    paths: list[str]
    labels: np.ndarray  # int32 class indices into `classes`
    classes: list[str]
    shas: list[str] | None = None  # each image's content sha256 from the manifest: its key in the embedding cache

    def __len__(self) -> int:
        return len(self.paths)


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
    shas = rows["sha256"].tolist() if "sha256" in rows else None
    return Split(rows["path"].tolist(), labels, list(classes), shas)


def default_limits() -> ImageLimits:
    """The image limits of the default `validate` settings (stages pass their own params' limits)."""
    return ImageLimits.from_config(ValidateConfig())


def load_rgb(source: str | Path | bytes, size: int, limits: ImageLimits | None = None) -> np.ndarray:
    """A (size, size, 3) uint8 RGB array through the guarded loader (components.ingestion.images)."""
    return decode_rgb(source, size, limits or default_limits())


# --- tf.data input pipelines --------------------------------------------------------------------
# Decoding (Pillow) and augmentation (albumentations) run as Python inside tf.data's parallel
# map: both release the GIL for the heavy work, so AUTOTUNE threads overlap them with training.
# Per-image seeds are drawn by tf.data in a fixed order (`components.modeling.image_augment`).


def _numpy_op(fn: Any, args: list[Any], image_size: int) -> Any:
    """Run a numpy image function inside tf.data, with the static shape Keras needs."""
    import tensorflow as tf

    image = tf.numpy_function(fn, args, tf.uint8, stateful=False)
    image.set_shape((image_size, image_size, 3))
    return image


def _image_ops(image_size: int, policy_path: str | None, limits: ImageLimits | None) -> tuple[Any, Any, Any]:
    """tf.data functions: path -> image, (image, seed) -> augmented, (path, seed) -> augmented."""

    def decode(path: bytes) -> np.ndarray:
        return load_rgb(path.decode(), image_size, limits)

    def augment(image: np.ndarray, image_seed: np.int64) -> np.ndarray:
        return augment_image(image, policy_path, image_seed)

    def decode_augment(path: bytes, image_seed: np.int64) -> np.ndarray:
        return augment(decode(path), image_seed)  # one Python hop per image instead of two

    return (
        lambda p: _numpy_op(decode, [p], image_size),
        lambda img, s: _numpy_op(augment, [img, s], image_size),
        lambda p, s: _numpy_op(decode_augment, [p, s], image_size),
    )


@dataclass(frozen=True)
class Batching:
    """How a split is batched, alike in both pipelines (`make_dataset`, `ImageBatches`).

    training=True shuffles each epoch and, with a `policy_path`, augments; training=False never
    augments (val/test must be scored on the images as they are). cache=True keeps decoded
    images in memory, before augmentation, so every epoch still sees fresh augmentations.
    batch_multiple (training, `ImageBatches` only): the last batch of an epoch is topped up with that epoch's
    first images to a multiple of this, for JAX data parallelism, which splits a batch only evenly
    (components.modeling.distribution); tf.data leaves it short: MirroredStrategy splits uneven batches.
    """

    policy_path: str | Path | None = None
    training: bool = False
    seed: int = 0
    cache: bool = False
    limits: ImageLimits | None = None
    batch_multiple: int = 1


class BatchOptions(TypedDict, total=False):
    """`Batching` as keyword arguments (its defaults apply to those left out)."""

    policy_path: str | Path | None
    training: bool
    seed: int
    cache: bool
    limits: ImageLimits | None
    batch_multiple: int


def make_dataset(split: Split, image_size: int, batch_size: int, **options: Unpack[BatchOptions]) -> Any:
    """Batches of (float32 images in 0..255, int32 labels) for one split, batched as `Batching` says."""
    import tensorflow as tf

    how = Batching(**options)
    autotune = tf.data.AUTOTUNE
    decode, augment, decode_augment = _image_ops(
        image_size, str(how.policy_path) if how.policy_path else None, how.limits
    )
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(split.paths, tf.string), tf.constant(split.labels, tf.int32)))
    if how.cache:
        ds = ds.map(lambda p, y: (decode(p), y), num_parallel_calls=autotune).cache()
    if how.training:
        size = min(len(split), 4096) if how.cache else len(split)
        ds = ds.shuffle(size, seed=how.seed, reshuffle_each_iteration=True)
    if how.training and how.policy_path is not None:
        # Per-image seeds drawn in element order: reproducible, and new ones every epoch.
        seeds = tf.data.Dataset.random(seed=how.seed, rerandomize_each_iteration=True)
        prepare = augment if how.cache else decode_augment
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda item, s: (prepare(item[0], s), item[1]), num_parallel_calls=autotune
        )
    elif not how.cache:
        ds = ds.map(lambda p, y: (decode(p), y), num_parallel_calls=autotune)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    return ds.batch(batch_size).prefetch(autotune)


def image_batches(
    paths: list[str],
    image_size: int,
    batch_size: int,
    *,
    policy_path: str | Path | None = None,
    seeds: np.ndarray | None = None,
    limits: ImageLimits | None = None,
) -> Any:
    """float32 image batches in the given order (for feature extraction), augmented with `seeds` if given.

    tf.data on the TensorFlow backend; elsewhere an `ImageBatches` of images only (without `seeds`).
    """
    if not uses_tf_data():
        if seeds is not None:
            raise NotImplementedError("augmented feature batches (explicit seeds) need the TensorFlow backend")
        return _image_batches_class()(list(paths), image_size, batch_size, limits=limits)
    import tensorflow as tf

    decode, _, decode_augment = _image_ops(image_size, str(policy_path) if policy_path else None, limits)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    if seeds is None:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64))))
        ds = ds.map(decode_augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda x: tf.cast(x, tf.float32)).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def uses_tf_data() -> bool:
    """Whether the input pipelines are tf.data (TensorFlow backend) or `ImageBatches` (any other)."""
    import keras

    return keras.config.backend() == "tensorflow"


def labelled_batches(split: Split, image_size: int, batch_size: int, **options: Unpack[BatchOptions]) -> Any:
    """Batches of (float32 images in 0..255, one-hot float32 labels) for fit/evaluate/predict.

    On TensorFlow: `make_dataset` with the labels one-hot encoded in the graph. On other backends:
    an `ImageBatches` with the same decoding, augmentation policy and meaning of each option.
    """
    if not uses_tf_data():
        return _image_batches_class()(split, image_size, batch_size, **options)
    import tensorflow as tf

    classes = len(split.classes)
    ds = make_dataset(split, image_size, batch_size, **options)
    return ds.map(lambda x, y: (x, tf.one_hot(y, classes)))


def epoch_callbacks(batches: Any) -> list[Any]:
    """[a callback telling an `ImageBatches` which epoch fit() starts] (so a resumed run sees the
    same order and augmentations); [] for tf.data, which counts its own iterations."""
    if not hasattr(batches, "epoch_callback"):
        return []
    return [batches.epoch_callback()]


# --- keras.utils.PyDataset input (any Keras backend, no TensorFlow) -----------------------------
# Batch `index` of epoch `epoch` is a pure function of (seed, epoch, index): the shuffle order and
# the per-image augmentation seeds both come from numpy generators seeded with those numbers, so
# batches are the same however Keras's worker threads are scheduled, and a run is reproducible.


def default_workers() -> int:
    """Loader threads: Pillow and albumentations (OpenCV) release the GIL; 2 on a 2-core machine, at most 4."""
    return min(4, runtime.available_cores())


@functools.cache
def _image_batches_class() -> type:
    import keras

    class ImageBatches(keras.utils.PyDataset):
        """Batches of float32 images (0..255) and one-hot float32 labels of a `Split` (numpy).

        The same images as `make_dataset`: `load_rgb` within `limits`; training=True shuffles every
        epoch and, with a `policy_path`, applies the saved albumentations policy (`augment_image`)
        with a seed per (seed, epoch, image); training=False never augments or shuffles.
        cache=True keeps decoded images in memory (before augmentation). Given a list of paths
        instead of a Split, batches are images only, in order (for predict). `epoch` is the epoch
        the next batches belong to: it advances at each epoch's end, and `epoch_callback()` sets it
        from fit()'s own epoch number.
        """

        def __init__(
            self,
            split: Split | list[str],
            image_size: int,
            batch_size: int,
            *,
            workers: int | None = None,
            use_multiprocessing: bool = False,
            max_queue_size: int = 10,
            **options: Unpack[BatchOptions],
        ) -> None:
            super().__init__(
                workers=default_workers() if workers is None else workers,
                use_multiprocessing=use_multiprocessing,
                max_queue_size=max_queue_size,
            )
            self.labelled = isinstance(split, Split)
            self.paths = list(split.paths if isinstance(split, Split) else split)
            self.labels = split.labels if isinstance(split, Split) else None
            self.num_classes = len(split.classes) if isinstance(split, Split) else 0
            self.image_size, self.batch_size = image_size, batch_size
            how = Batching(**options)
            self.policy_path = str(how.policy_path) if how.policy_path is not None and how.training else None
            self.training, self.seed, self.limits = how.training, how.seed, how.limits
            self.cache: dict[int, np.ndarray] | None = {} if how.cache else None
            self.batch_multiple = how.batch_multiple if how.training else 1
            self.epoch = 0

        def __len__(self) -> int:
            return math.ceil(len(self.paths) / self.batch_size)

        def order(self, epoch: int) -> np.ndarray:
            """The image indices of an epoch: a seeded permutation when training, else as given."""
            if not self.training:
                return np.arange(len(self.paths))
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))

        def _image(self, i: int) -> np.ndarray:
            if self.cache is None:
                return load_rgb(self.paths[i], self.image_size, self.limits)
            image = self.cache.get(i)
            if image is None:
                image = self.cache[i] = load_rgb(self.paths[i], self.image_size, self.limits)
            return image

        def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
            if not 0 <= index < len(self):
                raise IndexError(f"batch {index} of {len(self)}")
            epoch = self.epoch
            order = self.order(epoch)
            rows = order[index * self.batch_size : (index + 1) * self.batch_size]
            if len(rows) % self.batch_multiple:  # top up from the epoch's start (repeated if the split is tiny)
                rows = np.concatenate([rows, np.resize(order, self.batch_multiple - len(rows) % self.batch_multiple)])
            images = [self._image(int(i)) for i in rows]
            if self.policy_path is not None:
                seeds = np.random.default_rng([self.seed, epoch, index]).integers(0, 2**32, len(rows))
                images = [augment_image(image, self.policy_path, s) for image, s in zip(images, seeds)]
            x = np.stack(images).astype(np.float32)
            if not self.labelled:
                return (x,)
            return x, np.eye(self.num_classes, dtype=np.float32)[self.labels[rows]]

        def on_epoch_end(self) -> None:
            self.epoch += 1

        def epoch_callback(self) -> Any:
            batches = self

            class SetEpoch(keras.callbacks.Callback):
                def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                    batches.epoch = epoch

            return SetEpoch()

    return ImageBatches


def __getattr__(name: str) -> Any:
    # ImageBatches subclasses keras.utils.PyDataset: built on first use so importing this module
    # does not import Keras (and, on the TensorFlow backend, TensorFlow).
    if name == "ImageBatches":
        return _image_batches_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- labels ----------------------------------------------------------------------------------


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """'balanced': n / (k * count_c), so each class weighs the same in the loss; None otherwise."""
    if mode != "balanced":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}
