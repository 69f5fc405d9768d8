"""train_head: a frozen backbone, a new head, and a feature cache that changes nothing but speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.core import files
from components.modeling import linear_head
from components.modeling.data import load_rgb, load_split
from components.modeling.feature_cache import feature_cache_key
from components.train_head import main, run_train_head
from tests.evalkit import migrated_store
from tests.modelkit import CLASSES, head_paths, tiny_params, train_tiny_head, write_manifest


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, keras_home: Path):
    """One cached-features head run on the tiny manifest, shared by the tests below."""
    return train_tiny_head(tmp_path_factory.mktemp("train_head"))


@pytest.mark.slow
def test_cached_features_give_the_same_predictions_as_the_saved_full_model(trained):
    import keras

    root = trained["root"]
    model = keras.models.load_model(root / "models/head/model.keras")
    val_features = np.load(trained["result"].feature_cache / "val" / "features.npy", mmap_mode="r")
    from_cache = model.get_layer("head").predict(val_features, verbose=0)
    val = load_split(trained["manifest"], "val")
    from_images = model.predict(np.stack([load_rgb(p, 64) for p in val.paths]).astype("float32"), verbose=0)
    # The features may come from ONNX Runtime (within 1e-4 of Keras, checked at export): same predictions.
    np.testing.assert_allclose(from_cache, from_images, atol=1e-4)
    np.testing.assert_array_equal(from_cache.argmax(axis=1), from_images.argmax(axis=1))


@pytest.mark.slow
def test_features_run_on_onnx_runtime_where_installed_and_match_keras(trained, tmp_path: Path):
    import keras

    from components.modeling import backbones, onnx_inference
    from components.modeling.feature_cache import frozen_runner

    info = files.read_json(trained["root"] / "models/head/run.json")
    expected = "onnxruntime" if onnx_inference.onnxruntime_available() else "keras"
    assert info["feature_engine"] == expected
    extractor = backbones.feature_extractor(keras.models.load_model(trained["root"] / "models/head/model.keras"))
    images = np.random.default_rng(0).uniform(0, 255, (6, 64, 64, 3)).astype("float32")
    auto = frozen_runner(extractor, tiny_params().train_head, tmp_path / "features")
    keras_only = frozen_runner(extractor, tiny_params(train_head={"feature_engine": "keras"}).train_head, tmp_path)
    assert (auto.engine, keras_only.engine) == (expected, "keras")
    assert (tmp_path / "onnx").is_dir() == (expected == "onnxruntime")  # exported beside the feature cache
    reference = keras_only.predict(images)
    np.testing.assert_allclose(auto.predict(images), reference, atol=1e-4 * max(1.0, float(np.abs(reference).max())))
    for runner in (auto, keras_only):  # batch by batch (the feature cache's way): the same outputs, in order
        blocks = list(runner.predict_batches(images, batch_size=4))
        assert [len(b) for b in blocks] == [4, 2]
        np.testing.assert_allclose(
            np.concatenate(blocks), reference, atol=1e-4 * max(1.0, float(np.abs(reference).max()))
        )


@pytest.mark.slow
def test_validates_embedding_is_what_the_head_sees_of_an_unaugmented_image(trained):
    """Why train_head may read its un-augmented view from validate's embedding cache (same backbone, decode,
    preprocessing and average pooling; the classifier's resize is the identity at the model's size)."""
    import keras

    from components.modeling import backbones, embeddings

    params = tiny_params()
    assert params.train_head.pooling == "avg"
    extractor = backbones.feature_extractor(keras.models.load_model(trained["root"] / "models/head/model.keras"))
    val = load_split(trained["manifest"], "val")
    images = np.stack([load_rgb(p, params.model.image_size) for p in val.paths]).astype("float32")
    embedded = embeddings.embedding_model(params.model).predict(images, verbose=0)
    np.testing.assert_allclose(extractor.predict(images, verbose=0), embedded, atol=1e-5)
    manifest = pd.read_csv(trained["manifest"], dtype={"sha256": str})
    assert val.shas == manifest.query("split == 'val'")["sha256"].tolist()


@pytest.mark.slow
def test_model_dir_reports_and_mlflow_run_follow_the_contract(trained):
    from mlflow import MlflowClient

    root, result = trained["root"], trained["result"]
    assert files.read_json(root / "models/head/classes.json") == CLASSES
    info = files.read_json(root / "models/head/run.json")
    assert info["run_id"] == result.run_id and info["backbone"] == "mobilenet_v2" and info["image_size"] == 64
    assert {"experiment_id", "data_version", "best_epoch", "val_accuracy", "seconds"} <= set(info)
    assert info["head_solver"] is None and result.head == "adam"  # the default solver fits no linear head
    history = pd.read_csv(root / "reports/train_head/history.csv")
    assert list(history.columns) == ["epoch", "accuracy", "val_accuracy", "loss", "val_loss"]
    assert history["epoch"].tolist() == list(range(1, result.epochs_run + 1))
    assert (root / "reports/train_head/curves.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.data.tags["stage"] == "train_head" and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result.run_id, "val_accuracy")]
    assert steps == history["epoch"].tolist()
    assert {"train_head", "history.csv"} <= {a.path for a in client.list_artifacts(result.run_id)}
    assert "train_head/curves.png" in {a.path for a in client.list_artifacts(result.run_id, "train_head")}
    dataset = run.inputs.dataset_inputs[0]  # which data trained this model: the manifest, by its data version
    assert dataset.dataset.digest == info["data_version"][:36] and dataset.dataset.source_type == "local"


@pytest.mark.slow
def test_feature_cache_is_reused_and_keyed_by_what_changes_the_features(trained, monkeypatch: pytest.MonkeyPatch):
    root, manifest, policy = trained["root"], trained["manifest"], trained["policy"]
    params = tiny_params()
    key = feature_cache_key(params, manifest, policy)
    assert trained["result"].feature_cache.name == key  # a folder of .npy files per split
    assert feature_cache_key(tiny_params(train_head={"augmented_copies": 2}), manifest, policy) != key
    assert feature_cache_key(tiny_params(model={"alpha": 0.5}), manifest, policy) != key
    assert feature_cache_key(tiny_params(train_head={"epochs": 9}), manifest, policy) == key  # head-only knob
    assert feature_cache_key(tiny_params(train_head={"solver": "auto"}), manifest, policy) == key
    assert feature_cache_key(tiny_params(train_head={"feature_engine": "keras"}), manifest, policy) != key

    train_features = trained["result"].feature_cache / "train" / "features.npy"
    stamp = train_features.stat().st_mtime_ns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", migrated_store(root / "mlflow.db"))
    monkeypatch.chdir(root)
    again = run_train_head(
        tiny_params(train_head={"epochs": 1, "solver": "auto"}),
        head_paths(root, manifest, policy, "models/head2", "reports/head2"),
    )
    assert again.feature_cache == trained["result"].feature_cache
    assert train_features.stat().st_mtime_ns == stamp
    # solver auto: both heads were scored on val; the one kept is the lower val log-loss, and run.json reports it
    info = files.read_json(root / "models/head2/run.json")
    solver = info["head_solver"]
    losses = {name: solver[name]["val_loss"] for name in ("adam", "lbfgs")}
    assert solver["kept"] == again.head == min(losses, key=losses.get) and info["val_loss"] == losses[solver["kept"]]
    assert info["val_accuracy"] == solver[solver["kept"]]["val_accuracy"] == again.val_accuracy
    assert [row["C"] for row in solver["lbfgs"]["path"]] == [round(c, 6) for c in linear_head.C_GRID]


@pytest.mark.slow
def test_end_to_end_head_training_matches_the_cached_path_within_noise(trained, monkeypatch: pytest.MonkeyPatch):
    import keras

    root = trained["root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", migrated_store(root / "mlflow.db"))
    monkeypatch.chdir(root)
    e2e = run_train_head(
        tiny_params(train_head={"cached_features": False}),
        head_paths(root, trained["manifest"], trained["policy"], "models/e2e", "reports/e2e", cache="unused-cache"),
    )
    assert e2e.feature_cache is None and not (root / "unused-cache").exists()
    one_val_image = 1 / 4  # 2 classes x 2 val images
    assert abs(e2e.val_accuracy - trained["result"].val_accuracy) <= 2 * one_val_image
    assert keras.models.load_model(root / "models/e2e/model.keras").output.shape[-1] == len(CLASSES)


def test_cli_names_an_unknown_backbone_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    manifest = write_manifest(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"backbone": "resnet5O"}}))
    code = main(
        [
            "--params",
            str(params),
            "--manifest",
            str(manifest),
            "--policy",
            str(tmp_path / "none.json"),
            "--out-dir",
            str(tmp_path / "head"),
            "--report-dir",
            str(tmp_path / "reports"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "model.backbone" in err and "resnet50" in err
    assert not (tmp_path / "head").exists()


def test_feature_cache_key_changes_with_the_loaders_decode_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An upside-down photo (orientation 3) keeps its manifest row, yet decodes to other pixels once EXIF counts."""
    from components.ingestion import images

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n")
    key = feature_cache_key(tiny_params(), manifest, None)
    monkeypatch.setattr(images, "DECODE_VERSION", images.DECODE_VERSION + 1)
    assert feature_cache_key(tiny_params(), manifest, None) != key


def test_cli_paths_come_from_the_table_and_the_cache_is_anchored_at_the_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Defaults from TrainHeadPaths; a relative cache folder lands in the main workspace, the rest stay as given."""
    from components import train_head
    from components.core.paths import TrainHeadPaths

    assert TrainHeadPaths.from_args(train_head.build_parser().parse_args([])) == TrainHeadPaths()
    seen: list[TrainHeadPaths] = []

    def fake_run(params, paths):
        seen.append(paths)
        return train_head.TrainHeadResult("run", 0.5, 1, 1, 1.0, None, paths.out_dir)

    monkeypatch.setattr(train_head, "run_train_head", fake_run)
    monkeypatch.setattr(train_head, "workspace_root", lambda: tmp_path / "main")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert main(["--out-dir", "elsewhere/head"]) == 0
    assert seen[0].cache_dir == tmp_path / "main/data/cache/features"
    assert seen[0].out_dir == Path("elsewhere/head") and seen[0].manifest == TrainHeadPaths().manifest
