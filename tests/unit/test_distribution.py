"""Data parallelism (components.modeling.distribution): the plan each backend and device count gets, the global
batch, the even batches JAX needs, and one real data-parallel fit on two XLA host devices under JAX."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core import runtime
from components.core.config import Params
from components.modeling import data, distribution
from components.modeling.data import Split
from tests.conftest import REPO


def _images(folder: Path, count: int, size: int = 32) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _seen(monkeypatch: pytest.MonkeyPatch, **names: list[str]) -> None:
    """The device probe sees these devices per kind (the backend here is TensorFlow on a CPU)."""
    monkeypatch.setattr(
        runtime, "device_names", lambda kinds=("GPU",): [n for kind in kinds for n in names.get(kind, [])]
    )


def test_one_accelerator_gets_one_device_and_a_scope_that_does_nothing(monkeypatch):
    _seen(monkeypatch, GPU=["gpu:0"])
    plan = distribution.replica_plan("auto")
    assert (plan.replicas, plan.kind, plan.even_batches) == (1, "one device", False)
    assert plan.distribution() is None and isinstance(plan.scope(), contextlib.nullcontext)
    assert plan.global_batch(33) == 33
    assert plan.validation_callbacks("val") == ("val", [])
    model = object()
    assert plan.replicate(model) is model


def test_several_gpus_on_tensorflow_mirror_unless_data_parallel_is_off(monkeypatch):
    _seen(monkeypatch, GPU=["gpu:0", "gpu:1"], CPU=["cpu:0"])
    plan = distribution.replica_plan("auto")
    assert (plan.replicas, plan.kind, plan.devices) == (2, "MirroredStrategy", ("gpu:0", "gpu:1"))
    assert not plan.even_batches  # MirroredStrategy splits an uneven last batch itself
    assert plan.facts() == {"replicas": 2, "data_parallel": "MirroredStrategy", "replica_devices": ["gpu:0", "gpu:1"]}
    off = distribution.replica_plan("off")
    assert (off.replicas, off.reason) == (1, "data_parallel: off")


def test_host_cpus_never_mirror_on_tensorflow(monkeypatch):
    _seen(monkeypatch, CPU=["cpu:0", "cpu:1"])
    assert distribution.replica_plan("auto", kinds=("CPU",)).replicas == 1


def test_the_global_batch_is_rounded_to_the_replicas_and_says_so(capsys):
    plan = distribution.ReplicaPlan("jax", ("gpu:0", "gpu:1", "gpu:2"))
    assert plan.global_batch(30) == 30 and capsys.readouterr().out == ""
    assert plan.global_batch(32, "finetune.batch_size") == 30
    assert "finetune.batch_size 32 is the global batch" in capsys.readouterr().out
    assert plan.global_batch(2) == 3  # at least one image per replica


def test_the_device_probe_names_what_it_counts():
    names = runtime.device_names(("CPU",))
    assert names and all(n.startswith("cpu:") for n in names)
    assert runtime.visible_devices(("CPU",)) == len(names)


def test_data_parallel_is_a_setting_of_both_stages_and_on_by_default():
    params = Params()
    assert params.finetune.data_parallel == params.train_head.data_parallel == "auto"
    with pytest.raises(ValueError, match="data_parallel"):
        Params.model_validate({"finetune": {"data_parallel": "on"}})


def test_training_batches_are_topped_up_to_a_multiple_from_the_epoch_start(tmp_path):
    paths = _images(tmp_path, 5, size=8)
    split = Split(paths, np.array([0, 1, 0, 1, 0], np.int32), ["a", "b"])
    batches = data.ImageBatches(split, 8, 4, training=True, seed=1, batch_multiple=2, workers=1)
    first, last = batches[0], batches[1]
    assert len(first[0]) == 4 and len(last[0]) == 2  # 1 left over + 1 topped up
    np.testing.assert_array_equal(last[0][1], first[0][0])  # the epoch's first image
    val = data.ImageBatches(split, 8, 4, training=False, batch_multiple=2, workers=1)
    assert len(val[1][0]) == 1  # never padded outside training: val is scored outside the distribution


JAX_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):  # as on a GPU worker (and a faster start)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tf_keras"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: no TensorFlow on a GPU worker)")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
    from pathlib import Path
    import numpy as np
    import keras
    from components.core.stage_config import FinetuneConfig
    from components.modeling import data, distribution, fine_tuning, frozen_forward, optimization
    from components.modeling.checkpoints import Checkpoint
    from components.modeling.data import Split

    root = Path(sys.argv[1])
    paths = sorted(str(p) for p in (root / "images").glob("*.png"))
    labels = np.arange(len(paths), dtype=np.int32) % 3
    train, val = Split(paths[:8], labels[:8], ["a", "b", "c"]), Split(paths[8:], labels[8:], ["a", "b", "c"])
    config = FinetuneConfig(epochs=1, warmup_epochs=0, learning_rate=1e-2, batch_size=4)

    def build():
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, activation="relu")(x)
        x = keras.layers.BatchNormalization()(x, training=False)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
        optimization.compile_classifier(model, config.learning_rate, 0.1, jit_compile=True)
        return model

    class MeshSize(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            current = keras.distribution.distribution()
            self.size = 0 if current is None else int(current.device_mesh.devices.size)

    def fit(plan, name, weights=None):
        keras.utils.set_random_seed(0)
        with plan.scope():
            model = build()
            if weights is not None:
                model.set_weights(weights)
            start = model.get_weights()
            training = fine_tuning.TrainingInput(train, plan.global_batch(config.batch_size), None, 0,
                                                 data.default_limits(), plan)
            train_ds, val_ds = fine_tuning.datasets(training, val, 32)
            mesh, checkpoint = MeshSize(), Checkpoint(root / name)
            checkpoint.start("run")
            history, _ = fine_tuning.fit_resumable(model, train_ds, val_ds, config, checkpoint,
                                                   keras.callbacks.Callback(), [mesh], plan)
        sharded = {len(v.value.sharding.device_set) for v in model.weights}
        return model, start, history, mesh.size, sharded

    plan = distribution.replica_plan("auto", kinds=("CPU",))
    model, start, history, mesh, sharded = fit(plan, "parallel")
    one = distribution.replica_plan("off", kinds=("CPU",))
    single, _, single_history, single_mesh, _ = fit(one, "single", weights=start)
    evaluated = single.evaluate(data.labelled_batches(val, 32, 4), verbose=0, return_dict=True)

    runner = frozen_forward.FrozenRunner(model, engine="keras", parallel=plan)
    features = runner.predict(data.image_batches(paths, 32, 4))  # 11 images: the last batch (3) is padded to 4
    json.dump({
        "replicas": plan.replicas, "kind": plan.kind, "mesh": mesh, "single_mesh": single_mesh,
        "variable_devices": sorted(sharded), "runner_replicas": runner.replicas,
        "history": history.to_dict(orient="list"), "single_history": single_history.to_dict(orient="list"),
        "evaluated": evaluated,
        "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), single.get_weights())),
        "moved": max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), start)),
        "feature_diff": float(np.abs(features - single.predict(data.image_batches(paths, 32, 4), verbose=0)).max()),
        "feature_rows": len(features),
    }, open(root / "result.json", "w"))
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')")
def test_fine_tuning_fit_and_feature_pass_run_data_parallel_on_two_jax_devices(tmp_path):
    _images(tmp_path / "images", 11)  # 8 train (two even batches of 4), 3 val
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["replicas"], result["kind"], result["runner_replicas"]) == (2, "keras DataParallel", 2)
    assert (result["mesh"], result["single_mesh"]) == (2, 0)  # fit ran under a 2-device mesh; the other on one
    assert result["variable_devices"] == [2]  # every variable replicated on both devices
    history, single = result["history"], result["single_history"]
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert result["moved"] > 1e-3  # it trained
    assert result["max_weight_diff"] < 1e-4  # the same step as one device, split in two
    assert history["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)
    assert single["val_loss"][0] == pytest.approx(result["evaluated"]["loss"], abs=1e-5)
    assert history["loss"] == pytest.approx(single["loss"], abs=1e-4)
    assert result["feature_rows"] == 11 and result["feature_diff"] < 1e-4  # the padding's rows dropped
