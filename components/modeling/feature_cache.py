"""The frozen-feature cache of train_head: pooled backbone features of every image, computed once.

The frozen backbone runs in inference mode, so an image's pooled features are a pure function of the
image: they are computed once per image (plus `train_head.augmented_copies` augmented variants of each
training image) and cached on disk under a key of everything that determines them. The extractor runs
on ONNX Runtime where that is faster (components.modeling.onnx_inference), on Keras otherwise: there, with
several accelerators, data parallel over all of them (`train_head.data_parallel`, components.modeling.distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from components.core import files, hashing, runtime
from components.core.config import Params
from components.core.stage_config import TrainHeadConfig
from components.ingestion import images
from components.ingestion.images import ImageLimits
from components.modeling import distribution, frozen_forward
from components.modeling.data import Split, image_batches


def feature_cache_key(params: Params, manifest: str | Path, policy_path: str | Path | None) -> str:
    import keras

    m, h = params.model, params.train_head
    return hashing.content_key(
        {
            "data": hashing.file_sha256(manifest),
            "backbone": m.backbone,
            "alpha": m.alpha,
            "image_size": m.image_size,
            "weights": hashing.weights_identity(m.weights),
            "pooling": h.pooling,
            "policy": hashing.file_sha256(policy_path) if policy_path and h.augmented_copies else None,
            "copies": h.augmented_copies,
            "seed": params.project.seed,
            "keras": keras.__version__,
            "engine": h.feature_engine,
            "decoder": images.DECODE_VERSION,  # the same manifest decodes to other pixels after a loader change
        }
    )


def copy_seeds(seed: int, copy: int, count: int) -> np.ndarray:
    """Per-image augmentation seeds of one augmented copy: fixed, and different per copy."""
    return np.random.default_rng([seed, copy]).integers(0, 2**31 - 1, size=count, dtype=np.int64)


def extract_features(
    extractor: Any,
    split: Split,
    image_size: int,
    batch_size: int,
    *,
    policy_path: str | Path | None = None,
    copies: int = 0,
    seed: int = 0,
    limits: ImageLimits | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image as is, then of `copies` augmented variants: (features, labels)."""
    blocks, labels = [], []
    for copy in range(copies + 1):
        seeds = copy_seeds(seed, copy, len(split)) if copy else None
        print(f"features: {len(split)} images, " + (f"augmented copy {copy}/{copies}" if copy else "as is"))
        batches = image_batches(
            split.paths, image_size, batch_size, policy_path=policy_path if copy else None, seeds=seeds, limits=limits
        )
        blocks.append(np.asarray(extractor.predict(batches, verbose=runtime.progress_verbosity()), dtype=np.float32))
        labels.append(split.labels)
    return np.concatenate(blocks), np.concatenate(labels).astype(np.int32)


def cached_features(
    make_extractor: Callable[[], Any],
    splits: dict[str, Split],
    params: Params,
    manifest: str | Path,
    policy_path: str | Path | None,
    cache_dir: str | Path,
) -> tuple[dict[str, np.ndarray], Path]:
    """Load the feature cache for these inputs, or compute (with `make_extractor()`) and write it.

    `splits` maps "train", "val" and optionally "test" (the suspect-label check scores test images, un-augmented)
    to their images: a cache written without a split gains it with one pass over that split, the rest is reused.
    Returns arrays `<split>_x` (features) and `<split>_y` (labels), and the cache file.
    """
    path = Path(cache_dir) / f"{feature_cache_key(params, manifest, policy_path)}.npz"
    arrays: dict[str, np.ndarray] = {}
    if path.is_file():
        print(f"features: reusing cache {path}")
        with np.load(path) as cache:
            arrays = {k: cache[k] for k in cache.files}
    missing = [name for name in splits if f"{name}_x" not in arrays]
    if not missing:
        return arrays, path
    extractor = make_extractor()  # only on a miss: an ONNX export costs seconds
    h, size, seed = params.train_head, params.model.image_size, params.project.seed
    limits = ImageLimits.from_config(params.validate)
    for name in missing:
        split = splits[name]
        if not len(split):  # an empty test split: nothing to run the backbone on
            width = arrays["train_x"].shape[1]
            arrays[f"{name}_x"], arrays[f"{name}_y"] = np.zeros((0, width), np.float32), np.zeros(0, np.int32)
            continue
        copies = h.augmented_copies if name == "train" and policy_path else 0
        arrays[f"{name}_x"], arrays[f"{name}_y"] = extract_features(
            extractor,
            split,
            size,
            h.batch_size,
            policy_path=policy_path if copies else None,
            copies=copies,
            seed=seed,
            limits=limits,
        )
    with files.atomic_file(path, "wb") as fh:
        np.savez(fh, **arrays)
    return arrays, path


def frozen_runner(extractor: Any, config: TrainHeadConfig, cache_dir: str | Path) -> frozen_forward.FrozenRunner:
    """The feature extractor on ONNX Runtime where it is faster (a CPU with it installed), Keras otherwise.

    The ONNX file is cached by content next to the feature cache (the ImageNet backbone exports once).
    """
    runner = frozen_forward.FrozenRunner(
        extractor,
        cache_dir=Path(cache_dir).parent / "onnx",
        engine=config.feature_engine,
        parallel=distribution.replica_plan(config.data_parallel),
    )
    print(f"features: {runner.engine}, {runner.replicas} replica(s) ({runner.reason})")
    return runner
