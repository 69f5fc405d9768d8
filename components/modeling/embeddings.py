"""Image embeddings for validate's near-duplicate check: pooled features of the frozen ImageNet backbone.

An image's embedding is a pure function of its bytes and the model (`model:` in params.yaml), so it is
computed once and cached by the image's content sha256 under a model identity key: reruns and grown
data sets run the backbone on new images only. The cache is a folder per model key of chunk files
(`<key>/<n>.keys.npy`: sha256s, `<key>/<n>.npy`: float32 embeddings, one row each), written one chunk
at a time as batches come out of the backbone and read back as memory maps: memory holds a chunk, not
the data set. The pass runs on ONNX Runtime where that is faster (components.modeling.frozen_forward).

TensorFlow/Keras are imported only when an embedding is computed or a model key is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.core import array_rows, files, hashing, runtime
from components.core.config import ModelConfig
from components.ingestion import images
from components.ingestion.images import ImageLimits

if TYPE_CHECKING:
    from components.modeling.frozen_forward import Engine

CHUNK_ROWS = 2048  # embeddings per cache file: a chunk is what memory holds while writing
BATCH_SIZE = 32
EMBEDDING_VERSION = "gap-v1"  # global average pooling of the backbone; bump when the embedding changes


def model_key(model: ModelConfig) -> str:
    """Everything that decides an image's embedding, hashed: another backbone, size or weights is another cache."""
    import keras

    return hashing.content_key(
        {
            "backbone": model.backbone,
            "alpha": model.alpha,
            "image_size": model.image_size,
            "weights": hashing.weights_identity(model.weights),
            "keras": keras.__version__,
            "decoder": images.DECODE_VERSION,
            "embedding": EMBEDDING_VERSION,
        }
    )


def embedding_model(model: ModelConfig) -> Any:
    """Raw 0..255 images -> L2-comparable pooled features of the frozen backbone (average pooling)."""
    import keras

    from components.modeling.backbones import build_backbone, get_spec

    base = build_backbone(model)
    inputs = keras.Input((model.image_size, model.image_size, 3), dtype="float32", name="image")
    x = inputs
    for layer in get_spec(model.backbone).preprocessing():
        x = layer(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="embedding")(base(x, training=False))
    return keras.Model(inputs, pooled, name="embedding_model")


class EmbeddingCache:
    """The chunk files of one model key: which sha256s are cached, their rows as memory maps, new chunks."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.chunks: list[np.ndarray] = []  # read-only memory maps, one per chunk
        self.where: dict[str, tuple[int, int]] = {}  # sha256 -> (chunk, row)
        for keys_file in sorted(self.folder.glob("*.keys.npy")):
            try:
                keys = np.load(keys_file, allow_pickle=False)
                rows = np.load(keys_file.with_name(keys_file.name.replace(".keys", "")), mmap_mode="r")
            except (OSError, ValueError):
                continue  # a damaged chunk is recomputed, never trusted
            if rows.ndim != 2 or len(rows) != len(keys):
                continue
            self._add(keys.tolist(), rows)

    def _add(self, keys: list[str], rows: np.ndarray) -> None:
        chunk = len(self.chunks)
        self.chunks.append(rows)
        for row, sha in enumerate(keys):
            self.where.setdefault(sha, (chunk, row))

    def write_chunk(self, keys: list[str], rows: np.ndarray) -> None:
        """One new chunk file pair, named by its content so concurrent writers never clash; keys file last."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = hashing.content_key({"keys": keys})
        with files.atomic_file(self.folder / f"{name}.npy", "wb") as fh:
            np.save(fh, np.ascontiguousarray(rows, dtype=np.float32))
        with files.atomic_file(self.folder / f"{name}.keys.npy", "wb") as fh:
            np.save(fh, np.array(keys, dtype="U64"))
        self._add(keys, np.load(self.folder / f"{name}.npy", mmap_mode="r"))

    def rows(self, shas: list[str]) -> FrameEmbeddings:
        """The embeddings of `shas` (all cached), in that order, read on demand."""
        return FrameEmbeddings(self, shas)


class FrameEmbeddings:
    """Embeddings of a list of cached images, in order (components.quality.embedding_search.Embeddings)."""

    def __init__(self, cache: EmbeddingCache, shas: list[str]) -> None:
        self.cache, self.shas = cache, shas
        places = np.array([cache.where[sha] for sha in shas], dtype=np.int32).reshape(-1, 2)
        self.chunk, self.row = places[:, 0], places[:, 1]  # per image: its chunk file and row there

    def __len__(self) -> int:
        return len(self.shas)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """These images' embeddings, in the order asked: one fancy read per chunk file touched."""
        rows = np.asarray(rows, dtype=np.int64)
        width = self.cache.chunks[0].shape[1] if self.cache.chunks else 0
        out = np.empty((len(rows), width), np.float32)
        chunk = self.chunk[rows]
        for c in np.unique(chunk).tolist():
            at = np.flatnonzero(chunk == c)
            out[at] = array_rows.take(self.cache.chunks[c], self.row[rows[at]])  # pages released after the copy
        return out

    def blocks(self) -> Iterator[np.ndarray]:
        """A block of at most CHUNK_ROWS rows at a time: memory holds one block."""
        for start in range(0, len(self.shas), CHUNK_ROWS):
            yield self.take(np.arange(start, min(start + CHUNK_ROWS, len(self.shas))))


def cached_embeddings(
    frame: pd.DataFrame,
    cache_dir: str | Path,
    key: str,
    make_runner: Callable[[], Any],
    image_size: int,
    limits: ImageLimits,
    stage: str = "validate",
) -> EmbeddingCache:
    """The cache holding an embedding of every row of `frame` (path, sha256 columns): missing ones computed.

    `make_runner()` gives the forward pass (a FrozenRunner or anything with its `predict_batches`); it is
    called only when some image is not cached yet. Byte-identical rows are embedded once.
    """
    cache = EmbeddingCache(Path(cache_dir) / key)
    todo = frame.drop_duplicates("sha256")
    todo = todo[~todo["sha256"].isin(cache.where.keys())]
    if not len(todo):
        return cache
    from components.modeling.data import image_batches

    runner = make_runner()
    print(f"{stage}: embedding {len(todo)} new image(s) ({getattr(runner, 'engine', 'model')})")
    shas = todo["sha256"].tolist()
    for start in range(0, len(shas), CHUNK_ROWS):
        paths = todo["path"].iloc[start : start + CHUNK_ROWS].tolist()
        batches = image_batches(paths, image_size, BATCH_SIZE, limits=limits)
        blocks = list(runner.predict_batches(batches, batch_size=BATCH_SIZE, verbose=runtime.progress_verbosity()))
        cache.write_chunk(shas[start : start + len(paths)], np.concatenate(blocks))
    return cache


def shared_rows(
    paths: list[str],
    shas: list[str],
    make_runner: Callable[[], Any],
    cache_dir: str | Path,
    model: ModelConfig,
    limits: ImageLimits,
    stage: str,
) -> Iterator[np.ndarray]:
    """These images' embeddings in order, a block at a time, from the shared cache: the ones validate has not
    embedded yet are computed with `make_runner()` (a forward pass with the same output) and added to it."""
    frame = pd.DataFrame({"path": paths, "sha256": shas})
    cache = cached_embeddings(frame, cache_dir, model_key(model), make_runner, model.image_size, limits, stage)
    yield from cache.rows(list(shas)).blocks()


def embed_frame(
    frame: pd.DataFrame,
    model: ModelConfig,
    limits: ImageLimits,
    cache_dir: str | Path,
    onnx_dir: str | Path,
    engine: Engine = "auto",
) -> FrameEmbeddings:
    """validate's embedding pass: the embeddings of `frame`'s rows (path, sha256 columns), in order."""
    make_runner = runner_factory(model, onnx_dir, engine)
    cache = cached_embeddings(frame, cache_dir, model_key(model), make_runner, model.image_size, limits)
    return cache.rows(frame["sha256"].tolist())


def runner_factory(model: ModelConfig, onnx_dir: str | Path, engine: Engine = "auto") -> Callable[[], Any]:
    """`cached_embeddings`' make_runner: the embedding model on the fastest engine, built on first call."""

    def make_runner() -> Any:
        from components.modeling.frozen_forward import FrozenRunner

        return FrozenRunner(embedding_model(model), cache_dir=onnx_dir, engine=engine, input_size=model.image_size)

    return make_runner
