"""The frozen-feature cache on disk: .npy memory maps written batch by batch, whole or absent, and head
training that reads them batch by batch (issue 24). No backbone: a fake extractor over fake image batches."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.modeling import feature_cache, head_training
from components.modeling.data import Split
from tests.modelkit import tiny_params

WIDTH = 1280  # a MobileNetV2's pooled features


def fake_image_batches(paths: list[str], image_size: int, batch_size: int, *, seeds: Any = None, **_: Any) -> Any:
    """One value per image, batch by batch and lazily: its index, plus 0.5 in an augmented copy."""
    for start in range(0, len(paths), batch_size):
        ids = [float(p.split("_")[1].split(".")[0]) for p in paths[start : start + batch_size]]
        yield np.array(ids, dtype=np.float32)[:, None] + (0.5 if seeds is not None else 0.0)


class FakeExtractor:
    """Features of a fake batch: each image's value repeated `width` times; raises after `fail_after` batches."""

    def __init__(self, width: int = WIDTH, fail_after: int | None = None) -> None:
        self.width, self.fail_after, self.passes, self.batches = width, fail_after, 0, 0

    def predict_batches(self, batches: Any, *, batch_size: int, verbose: int = 0) -> Iterator[np.ndarray]:
        self.passes += 1
        for batch in batches:
            if self.fail_after is not None and self.batches >= self.fail_after:
                raise RuntimeError("killed mid-way")
            self.batches += 1
            yield np.repeat(batch, self.width, axis=1)


def split_of(count: int, label_of: int = 2) -> Split:
    return Split([f"img_{i}.jpg" for i in range(count)], np.arange(count, dtype=np.int32) % label_of, ["a", "b"])


@pytest.fixture
def cache_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(feature_cache, "image_batches", fake_image_batches)
    (tmp_path / "manifest.csv").write_text("path,label\n")
    (tmp_path / "policy.json").write_text("{}\n")
    params = tiny_params(train_head={"batch_size": 4, "augmented_copies": 2})
    return {
        "params": params,
        "manifest": tmp_path / "manifest.csv",
        "policy_path": tmp_path / "policy.json",
        "cache_dir": tmp_path / "cache",
    }


def test_features_are_npy_memory_maps_of_every_copy_and_are_reused(cache_inputs: dict[str, Any]):
    extractor = FakeExtractor(width=6)
    splits = {"train": split_of(10), "val": split_of(3)}
    arrays, path = feature_cache.cached_features(lambda: extractor, splits, **cache_inputs)
    key = feature_cache.feature_cache_key(cache_inputs["params"], cache_inputs["manifest"], cache_inputs["policy_path"])
    assert path == cache_inputs["cache_dir"] / key and extractor.passes == 3 + 1  # train as is + 2 copies, val
    on_disk = np.load(path / "train" / "features.npy", mmap_mode="r")
    assert on_disk.shape == (30, 6) and on_disk.dtype == np.float32
    for name in ("train_x", "train_y", "val_x", "val_y"):
        assert isinstance(arrays[name], np.memmap) and not arrays[name].flags.writeable
    assert arrays["val_x"].shape == (3, 6) and arrays["train_y"].tolist() == [0, 1] * 15
    np.testing.assert_array_equal(arrays["train_x"][:10, 0], np.arange(10))  # as is first, in split order
    np.testing.assert_array_equal(arrays["train_x"][10:, 0], np.tile(np.arange(10) + 0.5, 2))  # then the copies

    def no_extractor() -> Any:
        raise AssertionError("a complete cache needs no extractor")

    again, again_path = feature_cache.cached_features(no_extractor, splits, **cache_inputs)
    assert again_path == path
    np.testing.assert_array_equal(again["train_x"], arrays["train_x"])


def test_a_missing_split_is_added_with_one_pass_and_the_rest_is_reused(cache_inputs: dict[str, Any]):
    train, val = split_of(8), split_of(2)
    _, path = feature_cache.cached_features(FakeExtractor, {"train": train, "val": val}, **cache_inputs)
    stamp = (path / "train" / "features.npy").stat().st_mtime_ns
    extractor = FakeExtractor()
    arrays, _ = feature_cache.cached_features(
        lambda: extractor, {"train": train, "val": val, "test": split_of(5)}, **cache_inputs
    )
    assert extractor.passes == 1 and arrays["test_x"].shape == (5, WIDTH)
    assert (path / "train" / "features.npy").stat().st_mtime_ns == stamp

    def no_extractor() -> Any:
        raise AssertionError("an empty split needs no extractor")

    empty, _ = feature_cache.cached_features(no_extractor, {"train": train, "other": split_of(0)}, **cache_inputs)
    assert empty["other_x"].shape == (0, WIDTH) and empty["other_y"].shape == (0,)


def test_an_interrupted_write_leaves_nothing_that_is_reused(cache_inputs: dict[str, Any]):
    splits = {"train": split_of(12), "val": split_of(2)}
    with pytest.raises(RuntimeError, match="killed mid-way"):
        feature_cache.cached_features(lambda: FakeExtractor(fail_after=4), splits, **cache_inputs)
    key_dir = next(cache_inputs["cache_dir"].iterdir())
    assert list(key_dir.iterdir()) == []  # no split folder, no temp folder left behind
    extractor = FakeExtractor()
    arrays, _ = feature_cache.cached_features(lambda: extractor, splits, **cache_inputs)
    assert extractor.passes == 4 and arrays["train_x"].shape == (36, WIDTH)
    np.testing.assert_array_equal(arrays["train_x"][:12, -1], np.arange(12))


def test_an_extractor_that_gives_too_few_rows_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(feature_cache, "image_batches", lambda paths, *a, **k: fake_image_batches(paths[:-1], *a, **k))
    with pytest.raises(RuntimeError, match="gave 4 rows for 5 images"):
        feature_cache.extract_features(FakeExtractor(), split_of(5), 8, 2, tmp_path)


def test_extraction_memory_is_a_batch_not_the_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """numpy reports its allocations to tracemalloc: 8x the images may not need much more memory."""
    monkeypatch.setattr(feature_cache, "image_batches", fake_image_batches)

    def peak_bytes(count: int) -> int:
        out = tmp_path / str(count)
        out.mkdir()
        split = split_of(count)
        tracemalloc.start()
        try:
            feature_cache.extract_features(FakeExtractor(), split, 8, 16, out, policy_path="p", copies=2, seed=1)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak_bytes(64), peak_bytes(8 * 64)
    feature_bytes = 8 * 64 * 3 * WIDTH * 4  # 7.9 MB on disk
    assert np.load(tmp_path / "512" / "features.npy", mmap_mode="r").shape == (8 * 64 * 3, WIDTH)
    assert large < 1.5 * small, (small, large)
    assert large < feature_bytes / 8, (large, feature_bytes)


def test_training_rows_drop_every_copy_of_an_excluded_image():
    excluded = np.array([False, True, False, False, True])
    rows = head_training.training_rows(excluded, 15)
    np.testing.assert_array_equal(rows, np.flatnonzero(np.tile(~excluded, 3)))  # what the copy of the arrays kept
    np.testing.assert_array_equal(head_training.training_rows(np.zeros(4, bool), 8), np.arange(8))


def test_head_batches_read_from_a_memmap_in_the_seeded_order_of_shuffling_the_arrays(tmp_path: Path):
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40).astype(np.int32)
    features = (rng.normal(size=(40, 8)) + 3 * labels[:, None]).astype(np.float32)
    np.save(tmp_path / "x.npy", features)
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    rows = np.flatnonzero(np.arange(40) % 5 != 0)  # an index mask, not a copy of the arrays

    ds = head_training.vector_batches(x, labels, rows, 2, 8, seed=3, training=True)
    got = np.concatenate([b[0].numpy() for b in ds])
    old = tf.data.Dataset.from_tensor_slices((features[rows], labels[rows])).shuffle(len(rows), seed=3).batch(8)
    np.testing.assert_array_equal(got, np.concatenate([b[0].numpy() for b in old]))
    second = np.concatenate([b[0].numpy() for b in ds])
    assert not np.array_equal(got, second) and sorted(map(tuple, second)) == sorted(map(tuple, features[rows]))

    keras.utils.set_random_seed(0)
    head = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    head.compile(optimizer=keras.optimizers.Adam(0.1), loss="categorical_crossentropy", metrics=["accuracy"])
    val = head_training.vector_batches(x, labels, np.arange(40), 2, 8, seed=0, training=False)
    fit = head.fit(ds, validation_data=val, epochs=5, shuffle=False, verbose=0)
    assert fit.history["val_accuracy"][-1] >= 0.9
    assert head.predict(val, verbose=0).shape == (40, 2)

    # Small data: an epoch of at least min_epoch_steps batches reads the rows several times, each pass reshuffled.
    assert head_training.epoch_steps(len(rows), 8, min_steps=4) is None  # 32 rows = 4 batches: one pass is enough
    steps = head_training.epoch_steps(len(rows), 8, min_steps=12)
    assert steps == 12
    endless = head_training.vector_batches(x, labels, rows, 2, 8, seed=3, training=True, repeat=True)
    passes = np.concatenate([b[0].numpy() for b in endless.take(steps)]).reshape(3, len(rows), 8)
    assert all(sorted(map(tuple, p)) == sorted(map(tuple, features[rows])) for p in passes)
    assert not np.array_equal(passes[0], passes[1])
    fit = head.fit(endless, validation_data=val, epochs=2, steps_per_epoch=steps, shuffle=False, verbose=0)
    assert len(fit.history["loss"]) == 2


def test_extraction_leaves_no_feature_pages_resident(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The features are written by file writes, not through a writable map whose dirty pages stay resident
    until the pass ends (resident file pages are sampled at every batch, while the file is open)."""
    from tests.unit.test_array_rows import _resident_file_kb

    if _resident_file_kb() is None:
        pytest.skip("no /proc/self/status RssFile here")
    monkeypatch.setattr(feature_cache, "image_batches", fake_image_batches)
    samples: list[int] = []

    class SampledExtractor(FakeExtractor):
        def predict_batches(self, batches: Any, *, batch_size: int, verbose: int = 0) -> Iterator[np.ndarray]:
            for block in super().predict_batches(batches, batch_size=batch_size, verbose=verbose):
                samples.append(_resident_file_kb())
                yield block

    before = _resident_file_kb()
    feature_cache.extract_features(SampledExtractor(), split_of(3200), 8, 64, tmp_path, policy_path="p", copies=2)
    features = np.load(tmp_path / "features.npy", mmap_mode="r")
    assert features.shape == (9600, WIDTH) and features.nbytes > 48_000_000
    np.testing.assert_array_equal(features[[0, 3199, 3200, 9599], 7], [0, 3199, 0.5, 3199.5])
    assert max(samples) - before < 8_000, (before, max(samples))  # kB: not the 49 MB written


def shared_cache_inputs(cache_inputs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    """validate's embedding cache beside the feature cache, keyed without building a backbone."""
    from components.modeling import data, embeddings

    monkeypatch.setattr(data, "image_batches", fake_image_batches)  # what the embedding pass reads images with
    monkeypatch.setattr(embeddings, "model_key", lambda model: "model-key")
    return cache_inputs["cache_dir"].parent / "embeddings"


def with_shas(split: Split) -> Split:
    return Split(split.paths, split.labels, split.classes, [f"sha-{p}" for p in split.paths])


def test_the_unaugmented_view_is_validates_embedding_and_what_is_missing_is_added_for_both(
    cache_inputs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
):
    from components.modeling.embeddings import EmbeddingCache

    embedding_dir = shared_cache_inputs(cache_inputs, monkeypatch)
    train = with_shas(split_of(10))
    val = with_shas(Split([f"img_{i}.jpg" for i in (20, 21, 22)], np.array([0, 1, 0], np.int32), ["a", "b"]))
    validated = EmbeddingCache(embedding_dir / "model-key")  # validate embedded train images 0..6
    validated.write_chunk(train.shas[:7], np.repeat(np.arange(7, dtype=np.float32)[:, None] + 100, WIDTH, axis=1))
    extractor = FakeExtractor()
    arrays, _ = feature_cache.cached_features(
        lambda: extractor, {"train": train, "val": val}, **cache_inputs, embedding_dir=embedding_dir
    )
    as_is = arrays["train_x"][:10, 0]
    np.testing.assert_array_equal(as_is, [100, 101, 102, 103, 104, 105, 106, 7, 8, 9])  # 0..6 read, not recomputed
    np.testing.assert_array_equal(arrays["train_x"][10:, 0], np.tile(np.arange(10) + 0.5, 2))  # copies: extractor
    np.testing.assert_array_equal(arrays["val_x"][:, 0], [20, 21, 22])
    assert extractor.passes == 4  # train's 3 missing, 2 augmented copies, val's 3 missing
    shared = EmbeddingCache(embedding_dir / "model-key")
    assert set(train.shas + val.shas) <= shared.where.keys()  # validate's next run embeds nothing again
    np.testing.assert_array_equal(shared.rows(train.shas[7:]).take(np.arange(3))[:, 0], [7, 8, 9])


def test_max_pooled_features_are_not_taken_from_the_average_pooled_embeddings(
    cache_inputs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
):
    from components.modeling.embeddings import EmbeddingCache

    embedding_dir = shared_cache_inputs(cache_inputs, monkeypatch)
    train = with_shas(split_of(4))
    EmbeddingCache(embedding_dir / "model-key").write_chunk(train.shas, np.full((4, WIDTH), 100, np.float32))
    params = cache_inputs["params"].model_copy(
        update={"train_head": cache_inputs["params"].train_head.model_copy(update={"pooling": "max"})}
    )
    extractor = FakeExtractor()
    arrays, _ = feature_cache.cached_features(
        lambda: extractor,
        {"train": train, "val": with_shas(split_of(2))},
        **{**cache_inputs, "params": params},
        embedding_dir=embedding_dir,
    )
    np.testing.assert_array_equal(arrays["train_x"][:4, 0], np.arange(4))
