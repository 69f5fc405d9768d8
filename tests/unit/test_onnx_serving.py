"""ONNX Runtime past train_head: evaluate scores the test split with it, the served model carries the
checked file and runs it (refusing a changed one), models logged without it still serve with Keras,
and `evaluate.inference_engine: keras` never exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from components import evaluate
from components.core.config import Params, parse_params
from components.core.contracts import ContractError
from components.core.hashing import file_sha256
from components.core.paths import EvaluatePaths
from components.ingestion.images import ImageLimits
from components.lifecycle import model_packaging, registry
from components.modeling import onnx_inference
from components.modeling.model_folder import load_model_dir
from components.scoring import scoring, serving_model
from tests.conftest import COLORS, write_image
from tests.evalkit import CLASSES, make_model_dir, migrated_store, write_manifest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

TOLERANCE = 1e-4
NAME = "image-classifier"


def settings(engine: str = "auto") -> Params:
    return parse_params(
        {
            "evaluate": {"batch_size": 8, "worst_examples": 4, "inference_engine": engine},
            "tracking": {"retry_attempts": 2, "retry_backoff_s": 0},
        }
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One evaluate run with the default engine (auto) in a throwaway workspace: what it logged and registered."""
    ws = tmp_path_factory.mktemp("onnx_eval")
    mp = pytest.MonkeyPatch()
    mp.chdir(ws)
    mp.setenv("MLFLOW_TRACKING_URI", migrated_store(ws / "mlflow.db"))
    manifest, model_dir = write_manifest(ws), make_model_dir(ws / "good")
    result = evaluate.run_evaluate(settings(), EvaluatePaths(manifest=manifest, model_dir=model_dir).under(ws))
    yield {"ws": ws, "result": result, "model_dir": model_dir, "manifest": manifest}
    mp.undo()
    mlflow.set_tracking_uri(None)


def colour_images(root: Path) -> list[bytes]:
    return [
        write_image(root / f"c{c}.png", size=(30 + 20 * c, 44), color=COLORS[c], seed=c, fmt="PNG").read_bytes()
        for c in range(len(CLASSES))
    ] + [write_image(root / "noise.jpg", size=(50, 40), seed=9).read_bytes()]


def download(uri: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_scores_with_onnxruntime_and_the_probabilities_equal_keras(tmp_path: Path) -> None:
    manifest, folder = write_manifest(tmp_path), load_model_dir(make_model_dir(tmp_path / "m"))
    paths = pd.read_csv(manifest)["path"].tolist()
    limits = ImageLimits.from_config(settings().validate)
    onnx = evaluate.scoring_runner(folder.model, "auto", folder.image_size, tmp_path / "onnx")
    keras = evaluate.scoring_runner(folder.model, "keras", folder.image_size, tmp_path / "onnx")
    assert (onnx.engine, keras.engine) == ("onnxruntime", "keras"), onnx.reason
    got = evaluate.predict_probabilities(onnx, paths, folder.image_size, 8, limits)
    expected = evaluate.predict_probabilities(keras, paths, folder.image_size, 8, limits)
    assert got.shape == expected.shape == (len(paths), len(CLASSES))
    assert np.max(np.abs(got - expected)) <= TOLERANCE
    assert not np.allclose(got, got.mean(axis=0))  # the images really differ: the comparison means something


def test_evaluate_records_the_engine_and_logs_the_checked_onnx_file(evaluated: dict[str, Any]) -> None:
    ws, result = evaluated["ws"], evaluated["result"]
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["inference_engine"] == "onnxruntime"
    assert run.data.params["evaluate.inference_engine"] == "auto"
    cache = ws / onnx_inference.CACHE_DIR  # the workspace's one ONNX cache, where train_head's export goes too
    exported = list(cache.glob("*.onnx"))
    assert len(exported) == 1
    sha = file_sha256(exported[0])
    tags = MlflowClient().get_model_version(NAME, result.model_version).tags
    assert tags[scoring.ONNX_SHA256_TAG] == sha
    local = download(f"models:/{NAME}/{result.model_version}", ws / "dl")
    config = scoring.check_logged_model(local, tags[scoring.SHA256_TAG], sha)["config"]
    assert config["onnx_sha256"] == sha and config["serving_engine"] == "auto"
    logged = [p for p in local.rglob("*.onnx")]
    assert len(logged) == 1 and file_sha256(logged[0]) == sha
    assert f"onnxruntime=={__import__('onnxruntime').__version__}" in (local / "requirements.txt").read_text()


def test_keras_engine_never_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", migrated_store(tmp_path / "mlflow.db"))

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("evaluate.inference_engine: keras exported a model")

    monkeypatch.setattr(onnx_inference, "export_onnx", no_export)
    try:
        paths = EvaluatePaths(manifest=write_manifest(tmp_path), model_dir=make_model_dir(tmp_path / "m"))
        result = evaluate.run_evaluate(settings("keras"), paths.under(tmp_path))
        assert result.accuracy == 1.0
        assert MlflowClient().get_run(result.run_id).data.tags["inference_engine"] == "keras"
        assert not (tmp_path / onnx_inference.CACHE_DIR).exists()
        tags = MlflowClient().get_model_version(NAME, result.model_version).tags
        assert scoring.ONNX_SHA256_TAG not in tags
        local = download(f"models:/{NAME}/{result.model_version}", tmp_path / "dl")
        assert not list(local.rglob("*.onnx"))
        served = scoring.load_scoring_model(f"models:/{NAME}/{result.model_version}")
        assert served.engine == "keras"
    finally:
        mlflow.set_tracking_uri(None)


# --- the served model -------------------------------------------------------------------------


def test_served_model_runs_onnx_and_matches_the_keras_engine(evaluated: dict[str, Any], tmp_path: Path) -> None:
    uri = f"models:/{NAME}/{evaluated['result'].model_version}"
    onnx = scoring.load_scoring_model(uri).classifier
    assert onnx.engine == "onnxruntime" and onnx.session is not None
    local = download(uri, tmp_path / "dl")
    # A loader may force Keras without re-logging (what MLFLOW_PYFUNC_INFERENCE_CONFIG does for a server).
    keras = mlflow.pyfunc.load_model(str(local), model_config={"serving_engine": "keras"}).unwrap_python_model()
    assert keras.engine == "keras" and keras.session is None
    images = colour_images(tmp_path)
    got, expected = onnx.score(images), keras.score(images)
    assert got.shape == expected.shape == (len(images), len(CLASSES))
    assert np.max(np.abs(got - expected)) <= TOLERANCE
    assert list(got[:3].argmax(axis=1)) == [0, 1, 2]


def test_an_onnx_file_changed_after_logging_is_refused(evaluated: dict[str, Any], tmp_path: Path) -> None:
    local = download(f"models:/{NAME}/{evaluated['result'].model_version}", tmp_path / "dl")
    onnx_file = next(local.rglob("*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(Exception, match="sha256 differs"):
        mlflow.pyfunc.load_model(str(local))
    # Forcing Keras does not let a changed file through either: the model is refused on every machine.
    with pytest.raises(Exception, match="sha256 differs"):
        mlflow.pyfunc.load_model(str(local), model_config={"serving_engine": "keras"})


def test_an_onnx_hash_that_is_not_the_registered_one_is_refused(tmp_path: Path) -> None:
    def logged(name: str, config: dict[str, Any]) -> Path:
        root = tmp_path / name
        root.mkdir()
        flavor = {"loader_module": scoring.CODE_LOADER, "config": {"keras_sha256": "a" * 64, **config}}
        (root / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": flavor}}))
        return root

    with_onnx = logged("with", {"onnx_sha256": "c" * 64})
    assert scoring.check_logged_model(with_onnx, "a" * 64, "c" * 64)
    with pytest.raises(scoring.UnsafeModel, match="ONNX sha256 differs"):
        scoring.check_logged_model(with_onnx, "a" * 64, "d" * 64)
    with pytest.raises(scoring.UnsafeModel, match="ONNX sha256 differs"):  # a file the version never had
        scoring.check_logged_model(with_onnx, "a" * 64, None)
    assert scoring.check_logged_model(logged("old", {}), "a" * 64, None)  # registered before ONNX


def test_a_model_logged_without_onnx_still_serves_with_keras(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(migrated_store(tmp_path / "mlflow.db"))
    try:
        folder = load_model_dir(make_model_dir(tmp_path / "m"))
        params = settings()
        config = model_packaging.serving_model_config(params, folder.image_size, folder.info.model_sha256)
        assert not set(serving_model.ONNX_CONFIG_KEYS) & set(config)  # what models before this change carry
        limits = ImageLimits.from_config(params.validate)
        example = model_packaging.example_input(str(write_image(tmp_path / "ex.jpg")), limits)
        with mlflow.start_run():
            info = model_packaging.log_pyfunc(folder.model_path, folder.classes, config, example)
        version = registry.register_version("old", info.model_uri, {scoring.SHA256_TAG: folder.info.model_sha256})
        model = scoring.load_scoring_model(f"models:/old/{version}").classifier
        assert model.engine == "keras" and model.session is None
        assert list(model.score(colour_images(tmp_path))[:3].argmax(axis=1)) == [0, 1, 2]
    finally:
        mlflow.set_tracking_uri(None)


def test_an_onnx_file_without_a_recorded_hash_is_never_read(tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"not an onnx file")  # ONNX Runtime would fail on it: None proves it was left alone
    assert serving_model.onnx_session({serving_model.ONNX_ARTIFACT: str(junk)}, {}) is None
    with pytest.raises(ContractError, match="sha256 differs"):
        serving_model.onnx_session({serving_model.ONNX_ARTIFACT: str(junk)}, {"onnx_sha256": "0" * 64})


def test_loading_the_served_model_needs_onnxruntime_only(evaluated: dict[str, Any], tmp_path: Path) -> None:
    """The served code package holds onnx_inference, and loading it never imports the exporter (tf2onnx)."""
    package = model_packaging.code_closure(model_packaging.SERVING_MODEL)
    assert {"modeling/onnx_inference.py", "core/files.py", "core/hashing.py"} <= package
    assert "modeling/frozen_forward.py" not in package  # it runs a given file: no export, no engine choice
    local = download(f"models:/{NAME}/{evaluated['result'].model_version}", tmp_path / "dl")
    script = (
        "import sys, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]).unwrap_python_model(); "
        "print(m.engine, 'tf2onnx' in sys.modules, 'onnx' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(local)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )  # a fresh process: nothing exported or imported before
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "onnxruntime False False"


def test_batch_prediction_runs_the_served_onnx_file_and_says_so(
    evaluated: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.predict import run_predict

    folder = tmp_path / "incoming"
    for c, name in enumerate(CLASSES):
        write_image(folder / f"{name}.png", size=(40, 30 + 10 * c), color=COLORS[c], seed=c, fmt="PNG")
    result = run_predict(f"models:/{NAME}/{evaluated['result'].model_version}", folder, tmp_path / "p.csv")
    assert result.engine == "onnxruntime" and "runs on onnxruntime" in capsys.readouterr().out
    table = pd.read_csv(result.out_csv)
    assert [Path(p).stem for p in table["path"]] == sorted(CLASSES) and (
        table["label"] == table["path"].map(lambda p: Path(p).stem)
    ).all()
