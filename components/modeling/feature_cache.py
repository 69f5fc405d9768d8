"""The frozen-feature cache of train_head: pooled backbone features of every image, computed once.

The frozen backbone runs in inference mode, so an image's pooled features are a pure function of the
image: they are computed once per image (plus `train_head.augmented_copies` augmented variants of each
training image) and cached on disk under a key of everything that determines them. The extractor runs
on ONNX Runtime where that is faster (components.modeling.onnx_inference), on Keras otherwise: there, with
several accelerators, data parallel over all of them (`train_head.data_parallel`, components.modeling.distribution).


Memory stays about one batch at any data size: each batch's features are written into a preallocated
.npy per split (`<cache>/<key>/<split>/features.npy`, float32, images x (copies + 1) rows) by plain file
writes, and readers get read-only memory maps, never whole arrays (components/core/array_rows.py reads them
a chunk at a time and lets the pages go).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from components.core import files, hashing, runtime
from components.core.config import Params
from components.core.stage_config import TrainHeadConfig
from components.ingestion import images
from components.ingestion.images import ImageLimits
from components.modeling import distribution, frozen_forward
from components.modeling.data import Split, image_batches

FEATURES, LABELS = "features.npy", "labels.npy"  # one folder per split under the cache key: rows copy-major


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
    out_dir: str | Path,
    *,
    policy_path: str | Path | None = None,
    copies: int = 0,
    seed: int = 0,
    limits: ImageLimits | None = None,
    as_is: Callable[[Split], Iterator[np.ndarray]] | None = None,
) -> None:
    """Features of every image as is, then of `copies` augmented variants, into `out_dir`: FEATURES and LABELS.
    `as_is` gives the un-augmented view's blocks instead of the extractor (the shared embedding cache).

    Each batch's features go straight into a preallocated .npy on disk (its width is the first batch's):
    memory holds one batch, not the pass. `extractor.predict_batches` yields one batch's features at a time.
    """
    rows = len(split) * (copies + 1)
    np.save(Path(out_dir) / LABELS, np.tile(split.labels.astype(np.int32), copies + 1))
    features, row = None, 0
    try:
        blocks = _feature_blocks(extractor, split, image_size, batch_size, policy_path, copies, seed, limits, as_is)
        for block in blocks:
            if features is None:
                features = _row_writer(Path(out_dir) / FEATURES, (rows, *block.shape[1:]))
            if row + len(block) > rows:
                raise RuntimeError(f"features: the extractor gave more than {rows} rows for {rows} images")
            np.ascontiguousarray(block, dtype=np.float32).tofile(features)
            row += len(block)
    finally:
        if features is not None:
            features.close()
    if row != rows or features is None:
        raise RuntimeError(f"features: the extractor gave {row} rows for {rows} images")


def _feature_blocks(
    extractor: Any,
    split: Split,
    image_size: int,
    batch_size: int,
    policy_path: str | Path | None,
    copies: int,
    seed: int,
    limits: ImageLimits | None,
    as_is: Callable[[Split], Iterator[np.ndarray]] | None = None,
) -> Iterator[np.ndarray]:
    """One batch's features at a time: every image as is, then each augmented copy."""
    if as_is is not None:
        print(f"features: {len(split)} images, as is, from the shared embedding cache")
        yield from as_is(split)
    for copy in range(0 if as_is is None else 1, copies + 1):
        seeds = copy_seeds(seed, copy, len(split)) if copy else None
        print(f"features: {len(split)} images, " + (f"augmented copy {copy}/{copies}" if copy else "as is"))
        batches = image_batches(
            split.paths, image_size, batch_size, policy_path=policy_path if copy else None, seeds=seeds, limits=limits
        )
        yield from extractor.predict_batches(batches, batch_size=batch_size, verbose=runtime.progress_verbosity())


def _row_writer(path: Path, shape: tuple[int, ...]) -> BinaryIO:
    """A float32 .npy of `shape`, opened to have its rows written in order by plain file writes.

    Not through a writable memory map: its dirty pages would count in this process's resident set until
    written back, the whole file by the end of the pass; file writes go to the page cache alone.
    """
    header = np.lib.format.open_memmap(path, "w+", np.float32, shape)  # the header, and the file at full size
    offset = header.offset
    del header
    handle = open(path, "r+b")  # closed by extract_features
    handle.seek(offset)
    return handle


def _load_split(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read-only memory maps of one cached split: pages are read from disk as they are used."""
    return np.load(split_dir / FEATURES, mmap_mode="r"), np.load(split_dir / LABELS, mmap_mode="r")


def cached_features(
    make_extractor: Callable[[], Any],
    splits: dict[str, Split],
    params: Params,
    manifest: str | Path,
    policy_path: str | Path | None,
    cache_dir: str | Path,
    embedding_dir: str | Path | None = None,
) -> tuple[dict[str, np.ndarray], Path]:
    """Load the feature cache for these inputs, or compute (with `make_extractor()`) and write it.

    With `embedding_dir` (validate's embedding cache) and average pooling, the un-augmented view of every image
    is validate's embedding (the same backbone, decode and pooling): read from there, and what is missing there
    is computed once and added for both stages. Only the augmented copies always need the extractor.

    `splits` maps "train", "val" and optionally "test" (the suspect-label check scores test images, un-augmented)
    to their images: a cache written without a split gains it with one pass over that split, the rest is reused.
    Returns read-only memory maps `<split>_x` (features) and `<split>_y` (labels), and the cache folder
    (`<key>/<split>/features.npy`; an old `<key>.npz` cache is not read: the features are computed again).
    """
    path = Path(cache_dir) / feature_cache_key(params, manifest, policy_path)
    cached = [name for name in splits if (path / name / FEATURES).is_file()]
    if cached:
        print(f"features: reusing cache {path} ({', '.join(cached)})")
    missing = [name for name in splits if name not in cached]
    extractor = OnFirstUse(make_extractor)  # built only if some image has no cached features: an export costs seconds
    h, size, seed = params.train_head, params.model.image_size, params.project.seed
    limits = ImageLimits.from_config(params.validate)
    shared = embedding_dir is not None and h.pooling == "avg"  # validate's embedding is average-pooled
    for name in missing:
        split = splits[name]
        copies = h.augmented_copies if name == "train" and policy_path else 0
        # Whole or absent: a crash leaves a temp folder (swept by the next write), never one that looks complete.
        with files.atomic_dir(path / name) as tmp:
            if not len(split):  # an empty test split: nothing to run the backbone on
                width = _load_split(path / "train")[0].shape[1]
                np.save(tmp / FEATURES, np.zeros((0, width), np.float32))
                np.save(tmp / LABELS, np.zeros(0, np.int32))
                continue
            extract_features(
                extractor,
                split,
                size,
                h.batch_size,
                tmp,
                policy_path=policy_path if copies else None,
                copies=copies,
                seed=seed,
                limits=limits,
                as_is=shared_view(extractor.get, embedding_dir, params, limits) if shared and split.shas else None,
            )
    arrays: dict[str, np.ndarray] = {}
    for name in splits:
        arrays[f"{name}_x"], arrays[f"{name}_y"] = _load_split(path / name)
    return arrays, path


class OnFirstUse:
    """An extractor that is built (`make()`) when its first batch arrives, then kept."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.built = make, None

    def get(self) -> Any:
        if self.built is None:
            self.built = self.make()
        return self.built

    def predict_batches(self, batches: Any, **kwargs: Any) -> Iterator[np.ndarray]:
        return self.get().predict_batches(batches, **kwargs)


def shared_view(
    make_runner: Callable[[], Any], embedding_dir: str | Path, params: Params, limits: ImageLimits
) -> Callable[[Split], Iterator[np.ndarray]]:
    """A split's un-augmented features from the shared embedding cache (components.modeling.embeddings)."""
    from components.modeling import embeddings

    def blocks(split: Split) -> Iterator[np.ndarray]:
        return embeddings.shared_rows(
            split.paths, list(split.shas or []), make_runner, embedding_dir, params.model, limits, "features"
        )

    return blocks


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
