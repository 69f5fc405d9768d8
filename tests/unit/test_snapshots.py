"""Per-epoch weight snapshots (components/modeling/snapshots.py): off unless TP_EPOCH_SNAPSHOTS is set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.modeling import snapshots


def _fit(epochs: int, callbacks: list) -> object:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=8, callbacks=callbacks, verbose=0)
    return model


def test_unset_saves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TP_EPOCH_SNAPSHOTS", raising=False)
    assert snapshots.snapshot_callbacks("finetune") == []


def test_each_epoch_is_saved_and_logged_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TP_EPOCH_SNAPSHOTS", str(tmp_path))
    model = _fit(3, snapshots.snapshot_callbacks("train_head", weights_of="head"))
    records = snapshots.read_log(tmp_path)
    assert [(r["stage"], r["epoch"], r["weights_of"]) for r in records] == [
        ("train_head", e, "head") for e in (1, 2, 3)
    ]
    assert records[0]["ended_unix"] <= records[1]["ended_unix"] <= records[2]["ended_unix"]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["save_seconds"] >= 0 for r in records)
    # The last snapshot is the trained model: loading it into a fresh copy gives the same outputs.
    import keras

    fresh = keras.models.clone_model(model)
    fresh.load_weights(records[-1]["path"])
    probe = np.ones((2, 4), "float32")
    np.testing.assert_allclose(fresh.predict(probe, verbose=0), model.predict(probe, verbose=0), atol=1e-6)
    first = keras.models.clone_model(model)
    first.load_weights(records[0]["path"])
    assert not np.allclose(first.predict(probe, verbose=0), model.predict(probe, verbose=0))


def test_read_log_of_a_folder_without_one_is_empty(tmp_path: Path) -> None:
    assert snapshots.read_log(tmp_path) == []
