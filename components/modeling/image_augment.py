"""One image through the saved augmentation policy, with its own seed, from whichever worker thread runs it.

Both input pipelines in `components.modeling.data` call `augment_image`: tf.data from its parallel map's threads,
`ImageBatches` from Keras's loader threads. Each worker thread loads the saved pipeline once and re-seeds
it per image from a seed the pipeline draws in a fixed order, so augmentation is reproducible however the
threads are scheduled (a shared pipeline's random state would depend on which thread ran first).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from PIL import Image

# Keyed by OS thread id, not threading.local: TF calls Python from its own threads with a fresh
# Python thread state each time, which would wipe thread-local data after every image.
_WORKER_PIPELINES: dict[tuple[int, str], Any] = {}
_WORKER_LOCK = threading.Lock()


def worker_pipeline(policy_path: str) -> Any:
    """This worker thread's copy of the saved augmentation pipeline, loaded on its first image only."""
    key = (threading.get_ident(), policy_path)
    pipeline = _WORKER_PIPELINES.get(key)
    if pipeline is None:
        from components.modeling.transforms import load_pipeline  # late: albumentations loads only when augmenting

        pipeline = load_pipeline(policy_path, seed=0)
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
