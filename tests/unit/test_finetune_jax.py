"""The finetune stage end to end under KERAS_BACKEND=jax, as a GPU worker without TensorFlow runs it.

The head model is trained here (TensorFlow, the default backend); a subprocess with `import
tensorflow` made to fail fine-tunes it with `run_finetune` (input through the PyDataset, not
tf.data), and the model it writes loads back under TensorFlow here and gives the same probabilities.
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
from tests.modelkit import tiny_params, train_tiny_head

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None,
        reason="jax is not installed (pip install 'jax[cpu]'; it coexists with tensorflow-cpu 2.21)",
    ),
]

FINETUNE_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        \"\"\"As on the GPU machine: TensorFlow is not installed.\"\"\"
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tf_keras"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: no TensorFlow on a GPU worker)")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
    from pathlib import Path

    import numpy as np
    import keras
    from components import data
    from components.finetune import run_finetune
    from tests.modelkit import tiny_params

    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    pipelines = []
    labelled_batches = data.labelled_batches

    def recorded(*args, **kwargs):
        batches = labelled_batches(*args, **kwargs)
        pipelines.append(type(batches).__name__)
        return batches

    data.labelled_batches = recorded
    # flip_tta on: the mirror layer and the two-view calibration run under JAX too.
    params = tiny_params(finetune={"flip_tta": "on"})
    result = run_finetune(params, root / "validated.csv", root / "policy.json", root / "models/head",
                          out / "models/finetune", out / "reports", checkpoint_root=out / "ckpt")
    folder = data.load_model_dir(out / "models/finetune")
    val = data.load_split(root / "validated.csv", "val")
    x = np.stack([data.load_rgb(p, 64) for p in val.paths]).astype("float32")
    np.savez(out / "probs.npz", x=x, probs=np.asarray(folder.model.predict(x, verbose=0)))
    json.dump({"backend": keras.config.backend(), "pipelines": pipelines, "epochs_run": result.epochs_run,
               "tensorflow_imported": "tensorflow" in sys.modules}, open(out / "result.json", "w"))
""")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, keras_home: Path) -> Path:
    """A head model trained once under TensorFlow (1 epoch) on the tiny manifest; its folder's root."""
    return train_tiny_head(tmp_path_factory.mktemp("finetune_jax"), tiny_params(train_head={"epochs": 1}))["root"]


def test_finetune_runs_under_jax_without_tensorflow_and_tensorflow_loads_its_model(
    head: Path, tmp_path: Path, keras_home: Path
) -> None:
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }
    env.setdefault("KERAS_HOME", str(keras_home))
    done = subprocess.run(
        [sys.executable, "-c", FINETUNE_SCRIPT, str(head), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == "jax" and not result["tensorflow_imported"] and result["epochs_run"] == 1
    assert result["pipelines"] == ["ImageBatches", "ImageBatches"]  # train and val through the PyDataset
    run_info = json.loads((tmp_path / "models/finetune/run.json").read_text())
    assert run_info["device"]["backend"] == "jax" and run_info["device"]["input_pipeline"] == "PyDataset"
    assert (tmp_path / "models/finetune/drift_reference.npz").is_file()
    assert json.loads((tmp_path / "reports/calibration.json").read_text())["calibrated"]
    assert run_info["flip_tta"]

    # The model a JAX worker wrote is an ordinary model folder: TensorFlow (this process) loads it and agrees.
    from components.data import load_model_dir

    saved = np.load(tmp_path / "probs.npz")
    reloaded = load_model_dir(tmp_path / "models/finetune")
    np.testing.assert_allclose(reloaded.model.predict(saved["x"], verbose=0), saved["probs"], atol=1e-4)
