"""Mixup of training batches (Zhang et al., 2018): each image and its one-hot label blended with another image of
the same batch, by a weight drawn from Beta(alpha, alpha) per image. A lever of finetune (`finetune.mixup_alpha`),
measured in benchmarks/results/training_levers.md. Two forms with the same meaning: a tf.data map and a
`keras.utils.PyDataset` wrapper (backends without TensorFlow), each seeded so a run is reproducible.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


def mix_numpy(images: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator) -> tuple[Any, Any]:
    """(images, labels) blended with a random permutation of themselves, a Beta(alpha, alpha) weight per row."""
    weight = rng.beta(alpha, alpha, size=len(images))
    partner = rng.permutation(len(images))

    def mix_one(array: np.ndarray) -> np.ndarray:  # weight broadcast over each row, in the array's dtype
        row_weight = weight.astype(array.dtype).reshape(-1, *([1] * (array.ndim - 1)))
        return _blend(array, array[partner], row_weight)

    return mix_one(images), mix_one(labels)


def _blend(first: Any, second: Any, weight: Any) -> Any:
    return weight * first + (1.0 - weight) * second


def mixed_batches(batches: Any, alpha: float, seed: int) -> Any:
    """`batches` ((images, one-hot labels) batches: a tf.data.Dataset or an `ImageBatches`) with mixup at
    `alpha`; as given when alpha is 0."""
    if alpha <= 0:
        return batches
    if hasattr(batches, "epoch_callback"):
        return _mixed_batches_class()(batches, alpha, seed)
    return _mixed_dataset(batches, alpha, seed)


def _mixed_dataset(dataset: Any, alpha: float, seed: int) -> Any:
    import tensorflow as tf

    def beta(shape: Any, pair: Any) -> Any:  # Beta(a, a) as X / (X + Y) with X, Y ~ Gamma(a)
        x = tf.random.stateless_gamma(shape, pair, alpha)
        y = tf.random.stateless_gamma(shape, pair + 1, alpha)
        return x / (x + y)

    def mix_one(tensor: Any, partner: Any, weight: Any) -> Any:  # weight broadcast over each row, in its dtype
        shape = tf.concat([[-1], tf.ones([tf.rank(tensor) - 1], tf.int32)], 0)
        return _blend(tensor, tf.gather(tensor, partner), tf.reshape(tf.cast(weight, tensor.dtype), shape))

    def mix(batch: Any, pair: Any) -> Any:
        images, labels = batch
        count = tf.shape(images)[0]
        weight = beta([count], pair)
        partner = tf.random.experimental.stateless_shuffle(tf.range(count), pair + 2)
        return mix_one(images, partner, weight), mix_one(labels, partner, weight)

    # New seeds every epoch (rerandomize_each_iteration), the same sequence for the same seed.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(dataset, seeds).map(mix, num_parallel_calls=tf.data.AUTOTUNE)


@functools.cache
def _mixed_batches_class() -> type:
    import keras

    class MixedBatches(keras.utils.PyDataset):
        """An `ImageBatches` with mixup; batch `index` of epoch `epoch` mixes with a seed of (seed, epoch, index)."""

        def __init__(self, batches: Any, alpha: float, seed: int) -> None:
            super().__init__(workers=batches.workers, max_queue_size=batches.max_queue_size)
            self.batches, self.alpha, self.seed = batches, alpha, seed

        def __len__(self) -> int:
            return len(self.batches)

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            images, labels = self.batches[index]
            rng = np.random.default_rng([self.seed, self.batches.epoch, index])
            return mix_numpy(images, labels, self.alpha, rng)

        def on_epoch_end(self) -> None:
            self.batches.on_epoch_end()

        def epoch_callback(self) -> Any:
            return self.batches.epoch_callback()

    return MixedBatches
