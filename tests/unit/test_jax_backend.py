"""The project's model code under KERAS_BACKEND=jax (what a GPU worker without TensorFlow runs).

In a subprocess (the backend is fixed when Keras is imported): build the classifier with
components.backbones, run it on raw images of another size, unfreeze the top as finetune does and
take one training step with finetune's optimizer/schedule/loss, with `import tensorflow` made to
fail as on the GPU machine. The fine-tuned model saved under JAX then loads under TensorFlow here and
gives the same outputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None,
        reason="jax is not installed (pip install 'jax[cpu]'; it coexists with tensorflow-cpu 2.21)",
    ),
]

JAX_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        \"\"\"As on the GPU machine: TensorFlow is not installed (Keras's optional uses of it step aside).\"\"\"
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tf_keras"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: no TensorFlow on a GPU worker)")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
    import numpy as np
    import keras
    from components.backbones import build_classifier, get_spec, unfreeze_top
    from components.config import FinetuneConfig, ModelConfig, TrainHeadConfig
    from components.finetune import lr_schedule

    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    model, base = build_classifier(ModelConfig(backbone="mobilenet_v2", alpha=0.35, image_size=64,
                                               weights="imagenet"), 3, TrainHeadConfig())
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 70, 50, 3)).astype("float32")  # not the model's size: it resizes inside
    probs = np.asarray(model.predict(x, verbose=0))
    np.savez(out + "/forward.npz", x=x, probs=probs)

    config = FinetuneConfig(epochs=1, unfreeze_layers=20, warmup_epochs=0, learning_rate=1e-3)
    start = unfreeze_top(base, config, get_spec("mobilenet_v2").default_unfreeze_layers)
    model.compile(optimizer=keras.optimizers.Adam(lr_schedule(config, 1)),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    trained = next(l for l in base.layers[start:] if l.trainable and l.weights)
    frozen = next(l for l in base.layers[:start] if l.weights)
    bn = next(l for l in base.layers[start:] if isinstance(l, keras.layers.BatchNormalization))
    before = {n: np.array(l.weights[0]) for n, l in (("trained", trained), ("frozen", frozen))}
    moving_mean = np.array(bn.moving_mean)
    y = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    trained_probs = np.asarray(model.predict(x, verbose=0))
    model.save(out + "/model.keras")
    np.savez(out + "/trained.npz", probs=trained_probs)
    json.dump({
        "backend": keras.config.backend(),
        "probs_shape": list(probs.shape),
        "loss": float(history.history["loss"][0]),
        "trained_layer_changed": bool(np.abs(np.array(trained.weights[0]) - before["trained"]).max() > 0),
        "frozen_layer_changed": bool(np.abs(np.array(frozen.weights[0]) - before["frozen"]).max() > 0),
        "batchnorm_stats_changed": bool(np.abs(np.array(bn.moving_mean) - moving_mean).max() > 0),
    }, open(out + "/result.json", "w"))
""")


def test_classifier_builds_predicts_and_trains_under_jax(tmp_path: Path, keras_home: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    # The weights the session fixture seeded (Keras fixes its home at import, so pass it on explicitly).
    env.setdefault("KERAS_HOME", str(keras_home))
    done = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == "jax" and result["probs_shape"] == [4, 3]
    assert np.isfinite(result["loss"])
    assert result["trained_layer_changed"] and not result["frozen_layer_changed"]
    assert not result["batchnorm_stats_changed"]  # BatchNorm stays in inference mode, as in finetune on TF

    # The file a JAX worker saves is an ordinary .keras model: TensorFlow (this process) loads it and agrees.
    import keras

    import components.backbones  # noqa: F401  (registers the custom layers)

    forward, trained = np.load(tmp_path / "forward.npz"), np.load(tmp_path / "trained.npz")
    np.testing.assert_allclose(forward["probs"].sum(axis=1), 1.0, atol=1e-5)
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(forward["x"], verbose=0), trained["probs"], atol=1e-5)
