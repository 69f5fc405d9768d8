"""finetune: BatchNorm stays put, a killed run resumes, unfreeze mistakes name their key, the head's
weights are kept when fine-tuning does not beat them on val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.core import files
from components.core.config import ParamsError
from components.core.paths import FinetunePaths
from components.finetune import run_finetune
from components.modeling import model_choice
from components.modeling.backbones import plain_classifier, uses_crop_tta, uses_flip_tta
from components.modeling.model_choice import ValScore, decide_flip_tta, finetuned_beats_head
from tests.evalkit import migrated_store
from tests.modelkit import tiny_params, train_tiny_head

pytestmark = pytest.mark.slow  # trains models: `make test` runs it, `make test-fast` does not


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, keras_home: Path):
    """A head model trained once (1 epoch) on the tiny manifest."""
    trained = train_tiny_head(tmp_path_factory.mktemp("finetune"), tiny_params(train_head={"epochs": 1}))
    return {**trained, "head_run_id": trained["result"].run_id}


def paths(head, out_dir: Path, report_dir: Path) -> FinetunePaths:
    """Fine-tune the shared head model into `out_dir`."""
    return FinetunePaths(
        manifest=head["manifest"],
        policy=head["policy"],
        head_dir=head["root"] / "models/head",
        out_dir=out_dir,
        report_dir=report_dir,
    )


@pytest.fixture
def tracking(head, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = migrated_store(head["root"] / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(head["root"])
    return uri


def _batchnorm_stats(model) -> dict[str, list[np.ndarray]]:
    import keras

    backbone = plain_classifier(model).get_layer("backbone")
    # convert_to_numpy, not np.array: a Keras variable's __array__ lacks numpy 2's copy keyword
    return {
        layer.name: [keras.ops.convert_to_numpy(layer.moving_mean), keras.ops.convert_to_numpy(layer.moving_variance)]
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }


@pytest.fixture(scope="module")
def finetuned(head, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One fine-tuning run of the shared head (flip TTA on, its first epoch at low resolution) that beats the
    head on val, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("finetuned")
    compared: list[tuple[ValScore, ValScore]] = []
    read: list[str] = []  # every image file any part of the stage opens

    def fine_tuning_wins(head_score: ValScore, finetuned_score: ValScore) -> bool:
        compared.append((head_score, finetuned_score))
        return True

    with pytest.MonkeyPatch.context() as patch:
        from components.ingestion import images

        patch.setenv("MLFLOW_TRACKING_URI", migrated_store(head["root"] / "mlflow.db"))
        patch.chdir(head["root"])
        patch.setattr(model_choice, "finetuned_beats_head", fine_tuning_wins)
        read_limited = images.read_limited
        patch.setattr(images, "read_limited", lambda source, *a: read.append(str(source)) or read_limited(source, *a))
        result = run_finetune(
            tiny_params(finetune={"flip_tta": "on", "epochs": 2, "low_res_epochs": 1, "low_res_size": 32}),
            paths(head, root / "out", root / "reports"),
            checkpoint_root=root / "ckpt",
        )
    return {
        "result": result,
        "compared": compared,
        "read": read,
        "out": root / "out",
        "reports": root / "reports",
        "tracking": migrated_store(head["root"] / "mlflow.db"),
    }


def test_batchnorm_statistics_stay_frozen_while_the_top_layers_learn(head, finetuned):
    import keras

    before = keras.models.load_model(head["root"] / "models/head/model.keras")
    after = keras.models.load_model(finetuned["out"] / "model.keras")

    stats_before, stats_after = _batchnorm_stats(before), _batchnorm_stats(after)
    assert stats_before and stats_before.keys() == stats_after.keys()
    for name in stats_before:
        for old, new in zip(stats_before[name], stats_after[name]):
            np.testing.assert_array_equal(old, new, err_msg=f"BatchNorm {name} statistics moved")
    top_conv = (
        plain_classifier(after).get_layer("backbone").get_layer("Conv_1")
    )  # inside the unfrozen top: must have trained
    old_kernel = before.get_layer("backbone").get_layer("Conv_1").get_weights()[0]
    assert not np.allclose(top_conv.get_weights()[0], old_kernel)
    assert finetuned["result"].trainable_layers > 0


def test_finetuned_model_dir_keeps_the_contract_and_links_the_head_run(head, finetuned):
    import keras
    from mlflow import MlflowClient

    result, out, reports, tracking = (finetuned[k] for k in ("result", "out", "reports", "tracking"))
    # Nothing is chosen on test: early stopping, the kept weights, flip TTA and the temperature saw train and val.
    splits = pd.read_csv(head["manifest"]).set_index("path")["split"]
    assert set(splits[splits == "val"].index) <= set(finetuned["read"])
    assert not set(splits[splits == "test"].index) & set(finetuned["read"]), "finetune read a test image"
    info = files.read_json(out / "run.json")
    assert info["peak_learning_rate"] == 5e-5  # the tiny set's images per class are below 125
    assert info["head_run_id"] == head["head_run_id"] and info["run_id"] == result.run_id
    # Fine-tuning beat the head on val: its weights are the output, and both val scores are recorded.
    (head_score, finetuned_score), *others = finetuned["compared"]
    assert not others and result.kept == info["kept"] == "finetuned" and info["best_epoch"] >= 1
    assert (
        info["val_accuracy_head"] == head_score.accuracy and info["val_accuracy_finetuned"] == finetuned_score.accuracy
    )
    head_classes = files.read_json(head["root"] / "models/head/classes.json")
    assert files.read_json(out / "classes.json") == head_classes
    model = keras.models.load_model(out / "model.keras")
    probs = model.predict(np.full((1, 50, 70, 3), 128.0, "float32"), verbose=0)
    assert probs.dtype == np.float32 and probs.shape == (1, 2)
    # flip_tta: on: the saved model is the mean of the classifier on the image and on its mirror.
    assert info["flip_tta"] and uses_flip_tta(model)
    image = np.random.default_rng(3).uniform(0, 255, (2, 50, 70, 3)).astype("float32")
    single = plain_classifier(model)
    np.testing.assert_allclose(
        model.predict(image, verbose=0),
        (single.predict(image, verbose=0) + single.predict(image[:, :, ::-1], verbose=0)) / 2,
        atol=1e-6,
    )
    tags = MlflowClient(tracking).get_run(result.run_id).data.tags
    assert tags["stage"] == "finetune" and tags["head_run_id"] == head["head_run_id"]
    history = pd.read_csv(reports / "history.csv")
    assert list(history.columns) == ["epoch", "accuracy", "val_accuracy", "loss", "val_loss"]
    # Progressive resizing: epoch 1 at 32 px (through the shared layers: BatchNorm stayed put, test above), then
    # epoch 2 at the model's 64 px, the only one validated; a fresh start, not a resume.
    assert history["epoch"].tolist() == [2] and info["best_epoch"] == 2 and result.resumed_at_epoch == 1
    assert info["low_res_phase"]["epochs"] == 1 and info["low_res_phase"]["image_size"] == 32
    # Calibrated on val: the temperature is in the model folder, the metrics and MLflow, and it lowered val NLL.
    report = files.read_json(reports / "calibration.json")
    metrics = files.read_json(reports / "metrics.json")
    assert metrics["kept_head"] == 0
    assert report["calibrated"] and report["nll_after"] <= report["nll_before"]
    assert (
        info["temperature"] == pytest.approx(report["temperature"]) == pytest.approx(metrics["temperature"], abs=1e-4)
    )
    assert {"val_ece_before", "val_ece_after"} <= metrics.keys()
    assert metrics["flip_tta"] == 1 and {"val_accuracy_single_view", "val_accuracy_flip_tta"} <= metrics.keys()
    # crop_tta auto: judged on the same val images, and the saved model has the 4 views exactly when it was kept.
    assert {"crop_tta", "val_accuracy_crop_tta", "val_gain_crop_tta_low"} <= metrics.keys()
    assert (
        info["crop_tta"]
        == bool(metrics["crop_tta"])
        == uses_crop_tta(keras.models.load_model(result.out_dir / "model.keras"))
    )
    assert MlflowClient(tracking).get_run(result.run_id).data.metrics["temperature"] == pytest.approx(
        metrics["temperature"]
    )


def test_interrupted_finetune_resumes_at_the_next_epoch_and_keeps_the_head_when_it_did_not_beat_it(
    head, tracking, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A resumed run still compares with the head's own weights (not the epoch it resumed from); when
    fine-tuning does not beat them, the output is the head's weights, and that is recorded. The training levers
    are on, so the resume also restores their optimizer (per-layer rates, averaged weights) and mixed input."""
    import keras
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setattr(model_choice, "finetuned_beats_head", lambda head_score, finetuned_score: False)

    class KilledAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise KeyboardInterrupt("simulated kill after epoch 1")

    # calibrate and both TTAs off: the kept head's saved predictions are then exactly the head's
    settings = {"calibrate": False, "flip_tta": "off", "crop_tta": "off"}
    levers = {"ema_epochs": 0.5, "mixup_alpha": 0.2, "bottom_lr_factor": 0.1}
    params = tiny_params(finetune={"epochs": 2, "early_stopping_patience": 5, **settings, **levers})
    args = (params, paths(head, tmp_path / "out", tmp_path / "rep"))
    with pytest.raises(KeyboardInterrupt):
        run_finetune(*args, checkpoint_root=tmp_path / "ckpt", extra_callbacks=[KilledAfterFirstEpoch()])
    assert not (tmp_path / "out").exists()
    assert any((tmp_path / "ckpt").iterdir())  # the finished epoch is on disk
    killed = next((tmp_path / "ckpt").rglob("mlflow_run_id.txt")).read_text().strip()
    assert mlflow.active_run() is None and MlflowClient().get_run(killed).info.status == "FAILED"

    resumed = run_finetune(*args, checkpoint_root=tmp_path / "ckpt")
    assert resumed.resumed_at_epoch == 2
    assert resumed.run_id == killed and MlflowClient().get_run(killed).info.status == "FINISHED"  # the same run
    assert pd.read_csv(tmp_path / "rep/history.csv")["epoch"].tolist() == [1, 2]  # both epochs, across the kill
    assert not any((tmp_path / "ckpt").iterdir())  # removed after success

    images = np.random.default_rng(5).uniform(0, 255, (3, 50, 70, 3)).astype("float32")
    kept = keras.models.load_model(tmp_path / "out/model.keras").predict(images, verbose=0)
    head_model = keras.models.load_model(head["root"] / "models/head/model.keras")
    np.testing.assert_allclose(kept, head_model.predict(images, verbose=0), atol=1e-6)
    info, metrics = files.read_json(tmp_path / "out/run.json"), files.read_json(tmp_path / "rep/metrics.json")
    assert resumed.kept == info["kept"] == "head" and info["best_epoch"] == 0 and metrics["kept_head"] == 1
    assert info["val_accuracy"] == pytest.approx(info["val_accuracy_head"])  # the kept model's number
    assert {"val_accuracy_finetuned", "val_log_loss_finetuned", "val_log_loss_head"} <= info.keys()
    assert MlflowClient().get_run(killed).data.tags["finetune.kept"] == "head"
    assert {key: info["settings"]["finetune"][key] for key in levers} == levers


class WeightsOnlyModel:
    """Stands in for the classifier in `keep_better`: its val probabilities follow its current weights."""

    def __init__(self, weights: list[np.ndarray]) -> None:
        self.weights = weights

    def get_weights(self) -> list[np.ndarray]:
        return list(self.weights)

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.weights = list(weights)


@pytest.mark.parametrize("keep_head_if_not_better, kept", [(True, "head"), (False, "finetuned")])
def test_a_head_that_scores_higher_is_kept_only_when_the_setting_asks(keep_head_if_not_better, kept, monkeypatch):
    labels = np.array([0, 1, 1])
    right, wrong = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]]), np.array([[0.4, 0.6], [0.6, 0.4], [0.3, 0.7]])
    probs = {"head": right, "finetuned": wrong}  # the head is right on every val image, fine-tuning on one
    monkeypatch.setattr(
        model_choice, "views_scorer", lambda model, crop: lambda ds: np.stack([probs[model.weights[0]]] * 4)
    )
    model = WeightsOnlyModel(["finetuned"])
    config = tiny_params(finetune={"keep_head_if_not_better": keep_head_if_not_better}).finetune
    choice, views = model_choice.keep_better(model, ["head"], None, labels, config)
    assert choice.kept == kept and model.weights == [kept]
    np.testing.assert_array_equal(views[0], probs[kept])
    assert (choice.head.accuracy, choice.finetuned.accuracy) == (1.0, pytest.approx(1 / 3))  # both recorded


def test_fine_tuning_must_beat_the_head_on_val_beyond_noise():
    labels = np.zeros(60, dtype=int)

    def scored(right: int) -> ValScore:  # the first `right` val images right
        probs = np.tile([0.1, 0.9], (60, 1))
        probs[:right] = [0.9, 0.1]
        return ValScore.of(probs, labels)

    head = scored(56)
    assert not finetuned_beats_head(head, scored(58))  # hymenoptera's +2 of 60: inside the noise
    assert finetuned_beats_head(scored(40), scored(58))  # +18 of 60: well beyond it
    assert not finetuned_beats_head(head, scored(56)) and not finetuned_beats_head(head, scored(50))
    with pytest.raises(ValueError, match="per-image"):
        finetuned_beats_head(ValScore(0.8, 0.2), ValScore(0.9, 0.1))  # built by hand: nothing to pair


def test_unfreeze_point_beyond_the_backbone_names_the_key(head):
    import keras

    from components.modeling.backbones import unfreeze_top

    backbone = keras.models.load_model(head["root"] / "models/head/model.keras").get_layer("backbone")
    with pytest.raises(ParamsError, match=r"finetune\.unfreeze_layers = 100000 .*layers"):
        unfreeze_top(backbone, tiny_params(finetune={"unfreeze_layers": 100000}).finetune, 30)
    with pytest.raises(ParamsError, match=r"finetune\.unfreeze_from = 'block_99_add'"):
        unfreeze_top(backbone, tiny_params(finetune={"unfreeze_from": "block_99_add"}).finetune, 30)
    start = unfreeze_top(backbone, tiny_params(finetune={"unfreeze_from": "block_16_expand"}).finetune, 30)
    assert backbone.layers[start].name == "block_16_expand" and backbone.layers[start].trainable
    assert not any(layer.trainable for layer in backbone.layers[:start])
    assert not any(layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))


def test_flip_tta_is_kept_only_when_it_raises_val_accuracy_unless_forced():
    labels = np.array([0, 1, 1, 0])
    single = np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])  # 3 of 4 right
    better = np.array([[0.6, 0.4], [0.45, 0.55], [0.2, 0.8], [0.9, 0.1]])  # the mirror fixes row 2: 4 of 4
    decided = decide_flip_tta(single, better, labels, "auto")
    assert decided.applied and decided.val_accuracy_single_view == 0.75 and decided.val_accuracy_flip_tta == 1.0
    assert not decide_flip_tta(single, single, labels, "auto").applied  # a tie is not worth 2x inference
    assert decide_flip_tta(single, single, labels, "on").applied
    assert not decide_flip_tta(single, better, labels, "off").applied


def test_cli_paths_come_from_the_table_and_checkpoints_are_anchored_at_the_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Defaults from FinetunePaths; a relative checkpoint folder lands in the main workspace."""
    from components import finetune

    assert FinetunePaths.from_args(finetune.build_parser().parse_args([])) == FinetunePaths()
    seen: list[tuple[FinetunePaths, Path]] = []

    def fake_run(params, paths, *, checkpoint_root):
        seen.append((paths, checkpoint_root))
        return finetune.FinetuneResult("run", "head", 0.5, 1, 1, 1, 3, 1.0, paths.out_dir)

    monkeypatch.setattr(finetune, "run_finetune", fake_run)
    monkeypatch.setattr(finetune, "workspace_root", lambda: tmp_path / "main")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert finetune.main(["--head-dir", "other/head"]) == 0
    ((paths, checkpoint_root),) = seen
    assert paths.head_dir == Path("other/head") and paths.out_dir == FinetunePaths().out_dir
    assert checkpoint_root == tmp_path / "main/.checkpoints/finetune"


def test_the_peak_learning_rate_follows_the_training_images_per_class():
    from components.core.stage_config import FinetuneConfig
    from components.modeling.data import Split
    from components.modeling.fine_tuning import for_data
    from components.modeling.optimization import lr_schedule

    default = FinetuneConfig()
    assert [default.peak_rate(n) for n in (14.2, 92, 124.9, 125, 629)] == [5e-5, 5e-5, 5e-5, 2e-4, 2e-4]
    assert FinetuneConfig(learning_rate={50: 1e-4, 300: 2e-4}).peak_rate(10) == 1e-4  # below all: the lowest's
    assert FinetuneConfig(learning_rate=3e-4).peak_rate(10) == 3e-4  # a number is a number, at any size
    train = Split(paths=[f"{i}.jpg" for i in range(700)], labels=np.arange(700) % 2, classes=["a", "b"])
    resolved = for_data(default, train)  # 350 images per class
    assert resolved.learning_rate == 2e-4 and resolved.unfreeze_layers == default.unfreeze_layers
    with pytest.raises(ValueError, match="resolve it for the data"):
        lr_schedule(default, 10)  # an unresolved rule never reaches the optimizer
