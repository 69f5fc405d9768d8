"""The project's model code under KERAS_BACKEND=jax, as a GPU worker without TensorFlow runs it.

One subprocess (the backend is fixed when Keras is imported), with `import tensorflow` made to fail
as on the GPU machine, does two things: (1) builds the classifier with components.modeling.backbones, runs it
on raw images of another size, unfreezes the top as finetune does and takes one training step with
finetune's optimizer/schedule/loss; (2) runs the finetune stage end to end (`run_finetune`, input
through the PyDataset, not tf.data, with the training levers on) on a head trained here under TensorFlow.
The models it saves load under TensorFlow here and give the same outputs. One process for both: a JAX
start-up costs seconds.
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
from tests.evalkit import migrated_store
from tests.modelkit import tiny_params, train_tiny_head

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None,
        reason="jax is not installed (pip install 'jax[cpu]'; it coexists with tensorflow-cpu 2.21)",
    ),
]

JAX_WORKER_SCRIPT = textwrap.dedent("""
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
    from components.modeling.backbones import build_classifier, get_spec, unfreeze_top
    from components.core.stage_config import FinetuneConfig, TrainHeadConfig
    from components.core.config import ModelConfig
    from components.modeling.optimization import lr_schedule

    out = sys.argv[1]  # the backend checks write here
    as_np = keras.ops.convert_to_numpy
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
    before = {n: as_np(l.weights[0]) for n, l in (("trained", trained), ("frozen", frozen))}
    moving_mean = as_np(bn.moving_mean)
    y = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    trained_probs = np.asarray(model.predict(x, verbose=0))
    model.save(out + "/model.keras")
    np.savez(out + "/trained.npz", probs=trained_probs)
    json.dump({
        "backend": keras.config.backend(),
        "probs_shape": list(probs.shape),
        "loss": float(history.history["loss"][0]),
        "trained_layer_changed": bool(np.abs(as_np(trained.weights[0]) - before["trained"]).max() > 0),
        "frozen_layer_changed": bool(np.abs(as_np(frozen.weights[0]) - before["frozen"]).max() > 0),
        "batchnorm_stats_changed": bool(np.abs(as_np(bn.moving_mean) - moving_mean).max() > 0),
    }, open(out + "/result.json", "w"))

    # --- the finetune stage end to end, in the same worker process (one JAX start for both)
    from pathlib import Path

    from components.modeling import data, model_folder
    from components.finetune import run_finetune
    from components.core.paths import FinetunePaths
    from tests.modelkit import tiny_params

    from components.modeling import mixup

    root, out = Path(sys.argv[2]), Path(sys.argv[3])  # the finetune run

    def record_types(module, name):  # module.name replaced by a wrapper noting the type of each result
        original, seen = getattr(module, name), []

        def recorded(*args, **kwargs):
            made = original(*args, **kwargs)
            seen.append(type(made).__name__)
            return made

        setattr(module, name, recorded)
        return seen

    pipelines = record_types(data, "labelled_batches")
    mixed_inputs = record_types(mixup, "mixed_batches")
    # flip_tta on: the mirror layer and the two-view calibration run under JAX too; so do the training levers.
    levers = {"ema_epochs": 0.5, "mixup_alpha": 0.2, "bottom_lr_factor": 0.1}
    params = tiny_params(finetune={"flip_tta": "on", **levers})
    paths = FinetunePaths(manifest=root / "validated.csv", policy=root / "policy.json", head_dir=root / "models/head",
                          out_dir=out / "models/finetune", report_dir=out / "reports")
    result = run_finetune(params, paths, checkpoint_root=out / "ckpt")
    folder = model_folder.load_model_dir(out / "models/finetune")
    val = data.load_split(root / "validated.csv", "val")
    x = np.stack([data.load_rgb(p, 64) for p in val.paths]).astype("float32")
    np.savez(out / "probs.npz", x=x, probs=np.asarray(folder.model.predict(x, verbose=0)))
    json.dump({"backend": keras.config.backend(), "pipelines": pipelines, "epochs_run": result.epochs_run,
               "mixed_inputs": mixed_inputs, "tensorflow_imported": "tensorflow" in sys.modules},
              open(out / "result.json", "w"))
""")


@pytest.fixture(scope="module")
def jax_worker(tmp_path_factory: pytest.TempPathFactory, keras_home: Path) -> dict[str, Path]:
    """Run the script once: a head trained here under TensorFlow (1 epoch), then the JAX subprocess."""
    root = tmp_path_factory.mktemp("jax_worker")
    head = train_tiny_head(root / "head_ws", tiny_params(train_head={"epochs": 1}))["root"]
    backend_out, finetune_out = root / "backend", root / "finetune"
    backend_out.mkdir()
    finetune_out.mkdir()
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": migrated_store(finetune_out / "mlflow.db"),
    }
    # The weights the session fixture seeded (Keras fixes its home at import, so pass it on explicitly).
    env.setdefault("KERAS_HOME", str(keras_home))
    done = subprocess.run(
        [sys.executable, "-c", JAX_WORKER_SCRIPT, str(backend_out), str(head), str(finetune_out)],
        cwd=finetune_out,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {"backend": backend_out, "finetune": finetune_out}


def test_classifier_builds_predicts_and_trains_under_jax(jax_worker: dict[str, Path]) -> None:
    tmp_path = jax_worker["backend"]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == "jax" and result["probs_shape"] == [4, 3]
    assert np.isfinite(result["loss"])
    assert result["trained_layer_changed"] and not result["frozen_layer_changed"]
    assert not result["batchnorm_stats_changed"]  # BatchNorm stays in inference mode, as in finetune on TF

    # The file a JAX worker saves is an ordinary .keras model: TensorFlow (this process) loads it and agrees.
    import keras

    import components.modeling.backbones  # noqa: F401  (registers the custom layers)

    forward, trained = np.load(tmp_path / "forward.npz"), np.load(tmp_path / "trained.npz")
    np.testing.assert_allclose(forward["probs"].sum(axis=1), 1.0, atol=1e-5)
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(forward["x"], verbose=0), trained["probs"], atol=1e-5)


def test_finetune_runs_under_jax_without_tensorflow_and_tensorflow_loads_its_model(
    jax_worker: dict[str, Path],
) -> None:
    tmp_path = jax_worker["finetune"]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == "jax" and not result["tensorflow_imported"] and result["epochs_run"] == 1
    assert result["pipelines"] == ["ImageBatches", "ImageBatches"]  # train and val through the PyDataset
    assert result["mixed_inputs"] == ["MixedBatches"]  # training batches mixed up, by the PyDataset wrapper
    run_info = json.loads((tmp_path / "models/finetune/run.json").read_text())
    assert run_info["device"]["backend"] == "jax" and run_info["device"]["input_pipeline"] == "PyDataset"
    assert (tmp_path / "models/finetune/drift_reference.npz").is_file()
    assert json.loads((tmp_path / "reports/calibration.json").read_text())["calibrated"]
    assert run_info["flip_tta"]

    # The model a JAX worker wrote is an ordinary model folder: TensorFlow (this process) loads it and agrees.
    from components.modeling.model_folder import load_model_dir

    saved = np.load(tmp_path / "probs.npz")
    reloaded = load_model_dir(tmp_path / "models/finetune")
    np.testing.assert_allclose(reloaded.model.predict(saved["x"], verbose=0), saved["probs"], atol=1e-4)
