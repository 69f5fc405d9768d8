"""finetune's training levers (benchmarks/results/training_levers.md): mixup keeps labels distributions and is
seeded, discriminative rates scale each layer's step, the weight EMA lags the raw weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components.core.stage_config import FinetuneConfig
from components.modeling import low_res_phase, mixup, optimization


def test_mixup_blends_each_image_and_label_with_one_partner_by_the_same_weight():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 4, 4, 3)).astype("float32")
    labels = np.eye(4, dtype="float32")[[0, 1, 2, 3, 0, 1, 2, 3]]
    mixed, mixed_labels = mixup.mix_numpy(images, labels, 0.2, np.random.default_rng(1))

    assert mixed.dtype == images.dtype and mixed_labels.dtype == labels.dtype
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(mixed, images)
    weight = np.random.default_rng(1).beta(0.2, 0.2, size=8)  # the same draws, in the same order
    partner = np.random.default_rng(1)
    partner.beta(0.2, 0.2, size=8)
    order = partner.permutation(8)
    expected = weight[:, None, None, None] * images + (1 - weight[:, None, None, None]) * images[order]
    np.testing.assert_allclose(mixed, expected, rtol=1e-5)
    again, _ = mixup.mix_numpy(images, labels, 0.2, np.random.default_rng(1))
    np.testing.assert_array_equal(mixed, again)


def test_mixup_of_a_tf_dataset_is_seeded_and_new_every_epoch():
    import tensorflow as tf

    images = np.arange(6 * 2 * 2 * 3, dtype="float32").reshape(6, 2, 2, 3)
    labels = np.eye(3, dtype="float32")[[0, 1, 2, 0, 1, 2]]
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)

    def epochs(dataset) -> list[np.ndarray]:
        return [np.concatenate([x.numpy() for x, _ in dataset]) for _ in range(2)]

    first, second = epochs(mixup.mixed_batches(batches, 0.4, seed=3)), epochs(mixup.mixed_batches(batches, 0.4, 3))
    np.testing.assert_array_equal(first[0], second[0])  # same seed, same run
    assert not np.allclose(first[0], first[1])  # but each epoch mixes anew
    for _, mixed_labels in mixup.mixed_batches(batches, 0.4, 3):
        np.testing.assert_allclose(mixed_labels.numpy().sum(axis=1), 1.0, rtol=1e-6)
    assert mixup.mixed_batches(batches, 0.0, 3) is batches


def _tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="low")(inputs)
    hidden = keras.layers.Dense(3, name="mid")(hidden)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="top")(hidden))


def _fit_once(model, config: FinetuneConfig, factors: dict[str, float], steps: int = 1) -> list[np.ndarray]:
    """How far each weight moved in `steps` training steps."""
    before = [w.copy() for w in model.get_weights()]
    optimizer = optimization.finetune_optimizer(config, steps, factors)
    optimization.compile_classifier(model, None, 0.0, jit_compile=False, optimizer=optimizer)
    x = np.random.default_rng(0).uniform(size=(4 * steps, 4)).astype("float32")
    model.fit(x, np.eye(2, dtype="float32")[[0, 1] * 2 * steps], batch_size=4, epochs=1, shuffle=False, verbose=0)
    return [np.abs(after - old).mean() for after, old in zip(model.get_weights(), before)]


def test_discriminative_rates_go_geometrically_from_the_bottom_factor_to_the_full_rate():
    model = _tiny_model()
    factors = optimization.layer_rate_factors(model, ["low", "mid", "top"], 0.01)
    assert factors["low/kernel"] == pytest.approx(0.01) and factors["mid/bias"] == pytest.approx(0.1)
    assert factors["top/kernel"] == pytest.approx(1.0)
    assert optimization.layer_rate_factors(model, ["low", "mid"], 1.0) == {}

    config = FinetuneConfig(learning_rate=1e-2, warmup_epochs=0, epochs=1)
    moved = _fit_once(model, config, factors)  # Adam's first step moves every weight by about the rate
    assert moved[0] == pytest.approx(1e-4, rel=0.05) and moved[2] == pytest.approx(1e-3, rel=0.05)
    assert moved[4] == pytest.approx(1e-2, rel=0.05)


def test_the_weight_ema_is_written_into_the_model_and_lags_the_raw_weights():
    assert optimization.ema_momentum(0.0, 10) is None
    assert optimization.ema_momentum(0.5, 10) == pytest.approx(0.8)  # a horizon of 5 steps
    assert optimization.ema_momentum(0.5, 2) is None  # a horizon of one step averages nothing

    config = FinetuneConfig(learning_rate=1e-2, warmup_epochs=0, epochs=1)
    raw = _fit_once(_tiny_model(), config, {}, steps=6)
    averaged = _fit_once(_tiny_model(), config.model_copy(update={"ema_epochs": 0.5}), {}, steps=6)
    assert all(0 < ema < plain for ema, plain in zip(averaged, raw))


def test_mixup_of_image_batches_follows_their_epoch_and_keeps_their_epoch_callback():
    """The PyDataset form (backends without TensorFlow): batch `index` of epoch `epoch` mixes the same way in
    every run, whatever thread asks for it."""
    import keras

    class Batches(keras.utils.PyDataset):  # stands in for data.ImageBatches
        def __init__(self) -> None:
            super().__init__(workers=1, max_queue_size=2)
            self.epoch = 0
            self.images = np.arange(4 * 2 * 2 * 3, dtype="float32").reshape(4, 2, 2, 3)

        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            return self.images, np.eye(2, dtype="float32")[[0, 1, 0, 1]]

        def on_epoch_end(self) -> None:
            self.epoch += 1

        def epoch_callback(self):
            return "the inner callback"

    inner = Batches()
    mixed = mixup.mixed_batches(inner, 0.4, seed=7)
    first, labels = mixed[1]
    np.testing.assert_array_equal(first, mixup.mixed_batches(Batches(), 0.4, seed=7)[1][0])
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
    assert len(mixed) == 2 and mixed.epoch_callback() == "the inner callback"
    mixed.on_epoch_end()
    assert inner.epoch == 1 and not np.allclose(mixed[1][0], first)


def test_a_tta_model_around_a_classifier_trained_with_discriminative_rates_loads_in_a_fresh_process(tmp_path: Path):
    """finetune's TTA model wraps the compiled classifier, whose compile config names LayerwiseAdam: a process
    that loads it the project's way (model_folder, which imports backbones) must know that class."""
    import keras

    from tests.conftest import REPO

    model = _tiny_model()
    config = FinetuneConfig(learning_rate=1e-2, warmup_epochs=0, epochs=1)
    _fit_once(model, config, optimization.layer_rate_factors(model, ["low", "mid"], 0.1))
    inputs = keras.Input((4,))
    keras.Model(inputs, model(inputs)).save(tmp_path / "wrapped.keras")  # the nested model keeps its compile config
    load = (
        "import sys; from components.modeling.model_folder import load_keras_model; "
        "print(load_keras_model(sys.argv[1]).count_params())"
    )
    done = subprocess.run(
        [sys.executable, "-c", load, str(tmp_path / "wrapped.keras")], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(model.count_params())


def _resizing_classifier(size: int):
    """Shaped like backbones.build_classifier's model: any image -> resize -> a backbone built for `size` -> head."""
    import keras

    keras.utils.set_random_seed(0)
    inner = keras.Input((size, size, 3))
    backbone = keras.Model(inner, keras.layers.Conv2D(4, 3, name="conv")(inner), name="backbone")
    images = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(size, size, name=low_res_phase.RESIZE_LAYER)(images)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(x, training=False))
    return keras.Model(images, keras.layers.Dense(2, activation="softmax", name="head")(x)), backbone


def test_the_low_resolution_phase_trains_the_models_own_weights_with_its_own_optimizer():
    import keras
    import tensorflow as tf

    model, backbone = _resizing_classifier(16)
    config = FinetuneConfig(learning_rate=1e-2, epochs=3, low_res_epochs=1, warmup_epochs=0, bottom_lr_factor=0.1)
    factors = optimization.layer_rate_factors(model, ["conv"], config.bottom_lr_factor)
    optimizer = optimization.finetune_optimizer(config, 2, factors)
    optimization.compile_classifier(model, None, 0.0, jit_compile=False, optimizer=optimizer)
    before = [w.copy() for w in model.get_weights()]
    seen: list[tuple[int, ...]] = []
    backbone_call = backbone.call
    backbone.call = lambda x, *a, **k: seen.append(tuple(x.shape[1:3])) or backbone_call(x, *a, **k)
    images = np.random.default_rng(0).uniform(0, 255, (8, 8, 8, 3)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((images, np.eye(2, dtype="float32")[[0, 1] * 4])).batch(4)

    done = low_res_phase.train(model, batches, config.low_res_epochs, 8, 0.0)

    del backbone.call
    assert done["epochs"] == 1 and done["image_size"] == 8 and np.isfinite(done["train_loss"])
    assert set(seen) == {(8, 8)}  # the backbone saw the low-resolution images, not the model's 16 px
    assert all(not np.array_equal(a, b) for a, b in zip(model.get_weights(), before, strict=True))
    assert model.optimizer is optimizer and int(optimizer.iterations.numpy()) == 2  # the schedule runs on
    with pytest.raises(ValueError, match="incompatible"):  # the backbone checks its input size again
        backbone(keras.ops.zeros((1, 8, 8, 3)))
    assert model.predict(np.zeros((1, 30, 20, 3), "float32"), verbose=0).shape == (1, 2)


def test_low_resolution_epochs_must_leave_a_full_size_epoch_and_a_smaller_size():
    from components.core.config import ParamsError
    from components.modeling import fine_tuning
    from tests.modelkit import tiny_params

    with pytest.raises(ParamsError, match="finetune.low_res_epochs"):
        tiny_params(finetune={"epochs": 2, "low_res_epochs": 2})
    config = tiny_params(finetune={"epochs": 2, "low_res_epochs": 1, "low_res_size": 64}).finetune
    with pytest.raises(ValueError, match=r"finetune.low_res_size \(64\) must be below the model's image size \(64\)"):
        fine_tuning.check_low_res_size(config, 64)
    fine_tuning.check_low_res_size(config, 96)


def test_a_resumed_run_skips_the_low_resolution_epochs_its_backup_already_holds(tmp_path: Path):
    from components.modeling import fine_tuning
    from components.modeling.checkpoints import BACKUP, Checkpoint

    config = FinetuneConfig(epochs=3, low_res_epochs=1, low_res_size=32)
    checkpoint = Checkpoint(tmp_path / "key")
    (checkpoint.folder / BACKUP).mkdir(parents=True)  # an epoch after the low-resolution ones finished
    assert checkpoint.has_backup()
    # Returns before it touches the model, the data or the plan: fit() resumes from the backup instead.
    assert fine_tuning.low_res_first(None, config, 64, None, checkpoint) is None
    with pytest.raises(ValueError, match="low_res_size"):
        fine_tuning.low_res_first(None, config, 32, None, checkpoint)
