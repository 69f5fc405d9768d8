"""The served model takes image data only, within its stored limits; batch scoring reads files within a root."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import predict
from components.core.config import parse_params
from components.ingestion.images import ImageLimits
from components.lifecycle import model_packaging, registry
from components.lifecycle.model_packaging import example_input
from components.modeling.model_folder import load_model_dir
from components.predict import run_predict
from components.scoring import scoring, serving_model
from tests.conftest import COLORS, write_image
from tests.evalkit import CLASSES, make_model_dir, migrated_store, write_manifest

# Small limits, so each one can be crossed with tiny images.
LIMITS = {
    "evaluate": {
        "batch_size": 4,
        "serving": {
            "max_images_per_request": 5,
            "max_request_bytes": 50_000,
            "max_pixels": 170 * 170,  # serving's own cap, below the training cap
            "max_request_pixels": 60_000,
        },
    },
    "validate": {"max_pixels": 200 * 200, "max_image_bytes": 30_000, "min_width": 8, "min_height": 8},
}
GENERIC = "image row 0: not a usable image"


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The served model as evaluate logs and registers it, for a perfect colour model, in a throwaway store."""
    root = tmp_path_factory.mktemp("predict")
    mlflow.set_tracking_uri(migrated_store(root / "mlflow.db"))
    experiment = mlflow.create_experiment("predict-tests", artifact_location=(root / "mlruns").as_uri())
    folder = load_model_dir(make_model_dir(root / "model"))
    params = parse_params(LIMITS)
    config = model_packaging.serving_model_config(params, folder.image_size, folder.info.model_sha256)
    example = example_input(str(write_image(root / "example.jpg")), ImageLimits.from_config(params.validate))
    with mlflow.start_run(experiment_id=experiment):
        info = model_packaging.log_pyfunc(folder.model_path, folder.classes, config, example)
    version = registry.register_version("served", info.model_uri, {scoring.SHA256_TAG: folder.info.model_sha256})
    yield {"uri": info.model_uri, "registered": f"models:/served/{version}", "root": root, "experiment": experiment}
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def pyfunc(logged: dict[str, Any]) -> Any:
    return mlflow.pyfunc.load_model(logged["uri"])


def coloured_images(root: Path) -> dict[str, Path]:
    """One image per class, each a different size (the model must accept any size)."""
    return {
        name: write_image(root / f"{name}.png", size=(30 + 40 * c, 50 + 10 * c), color=COLORS[c], seed=c, fmt="PNG")
        for c, name in enumerate(CLASSES)
    }


def rejection(pyfunc: Any, values: list[Any]) -> str:
    with pytest.raises(Exception) as caught:
        pyfunc.predict(pd.DataFrame({"image": values}))
    return str(caught.value)


def test_pyfunc_labels_raw_bytes_base64_and_data_uris(pyfunc: Any, tmp_path: Path) -> None:
    raw = [p.read_bytes() for p in coloured_images(tmp_path).values()]
    forms = {
        "bytes": raw,
        "base64": [base64.b64encode(b).decode() for b in raw],
        "data uri": ["data:image/png;base64," + base64.b64encode(b).decode() for b in raw],
    }
    for form, values in forms.items():
        out = pyfunc.predict(pd.DataFrame({"image": values}))
        assert out["label"].tolist() == CLASSES, form
        assert (out["probability"] > 0.9).all(), form
        assert set(out["probabilities"].iloc[0]) == set(CLASSES), form


def test_a_server_path_is_not_image_data_and_gets_the_generic_error(pyfunc: Any, tmp_path: Path) -> None:
    """No existence probe: an existing image file, a missing one and plain junk answer the same."""
    existing = coloured_images(tmp_path)["alpha"]
    answers = {
        rejection(pyfunc, [value])
        for value in (
            str(existing),
            str(tmp_path / "missing.png"),
            "/etc/passwd",
            "/etc/does-not-exist",
            "hello",
            b"junk",
        )
    }
    assert len(answers) == 1
    assert GENERIC in answers.pop()


def test_every_unusable_image_gets_the_same_error(pyfunc: Any, tmp_path: Path) -> None:
    def encoded(img: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, fmt)
        return buffer.getvalue()

    small = Image.new("RGB", (40, 40), COLORS[0])
    cases = {
        "too many pixels": encoded(Image.new("RGB", (250, 250), COLORS[0]), "PNG"),  # 62,500 > max_pixels 40,000
        "format not allowed": encoded(small, "GIF"),
        "truncated": encoded(small, "PNG")[:60],
        "empty": b"",
        "over the byte cap": b"\xff" * 30_001,
        "not base64": "%%%%",
    }
    answers = {name: rejection(pyfunc, [value]) for name, value in cases.items()}
    assert all(GENERIC in a for a in answers.values()), answers
    assert len({a.split("\n")[0] for a in answers.values()}) == 1


def test_requests_over_the_stored_limits_are_refused(pyfunc: Any, tmp_path: Path) -> None:
    image = coloured_images(tmp_path)["alpha"].read_bytes()  # about 5 KB
    assert "at most 5 images" in rejection(pyfunc, [image] * 6)
    big = write_image(tmp_path / "big.png", size=(80, 60), seed=3, fmt="PNG").read_bytes()
    assert 12_500 < len(big) < 30_000
    assert "at most 50000 bytes of image data" in rejection(pyfunc, [big] * 4)
    assert len(pyfunc.predict(pd.DataFrame({"image": [image] * 5}))) == 5


def test_serving_has_its_own_pixel_cap_and_a_decode_budget_per_request(
    pyfunc: Any, logged: dict[str, Any], tmp_path: Path
) -> None:
    """Served: at most 170x170 pixels an image and 60,000 a request. Batch scoring keeps the training cap."""

    def plain(side: int, name: str) -> Path:  # one colour: a few hundred bytes, whatever its size
        Image.new("RGB", (side, side), COLORS[0]).save(tmp_path / "in" / name, "PNG")
        return tmp_path / "in" / name

    (tmp_path / "in").mkdir()
    over_serving_cap = plain(180, "big.png")  # 32,400 pixels: over serving's 28,900, under training's 40,000
    assert GENERIC in rejection(pyfunc, [over_serving_cap.read_bytes()])
    limits = ImageLimits.from_config(parse_params(LIMITS).validate)
    scored = run_predict(logged["uri"], tmp_path / "in", tmp_path / "p.csv", limits=limits)
    assert (scored.n_images, scored.n_failed) == (1, 0)
    medium = plain(150, "medium.png").read_bytes()  # 22,500 pixels
    assert len(pyfunc.predict(pd.DataFrame({"image": [medium] * 2}))) == 2  # 45,000 fit the budget
    assert "at most 60000 pixels" in rejection(pyfunc, [medium] * 3)  # 67,500 do not


def test_models_logged_before_the_serving_caps_keep_their_training_cap() -> None:
    config = {
        "max_images_per_request": 64,
        "max_request_bytes": 1000,
        "max_image_bytes": 100,
        "max_pixels": 40_000,
        "allowed_formats": ["png"],
    }
    old = serving_model.ServingLimits.from_model_config(config)
    assert (old.image.max_pixels, old.max_request_pixels, old.image.formats) == (40_000, None, ("PNG",))
    new = serving_model.ServingLimits.from_model_config(
        {**config, "serving_max_pixels": 10_000, "max_request_pixels": 50_000}
    )
    assert (new.image.max_pixels, new.max_request_pixels) == (10_000, 50_000)


def test_logged_model_holds_no_pickle_and_stores_its_limits_and_hash(logged: dict[str, Any]) -> None:
    local = Path(mlflow.artifacts.download_artifacts(logged["uri"]))
    names = {p.name for p in local.rglob("*")}
    assert not {n for n in names if n.endswith((".pkl", ".pickle"))} and "python_model.pkl" not in names
    assert "cloudpickle" not in (local / "requirements.txt").read_text()
    flavor = scoring.check_logged_model(local)
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    config = flavor["config"]
    assert (config["max_images_per_request"], config["max_request_bytes"]) == (5, 50_000)
    assert (config["max_pixels"], config["max_image_bytes"], config["allowed_formats"]) == (
        40_000,
        30_000,
        ["JPEG", "PNG", "BMP", "WEBP"],
    )
    assert (config["serving_max_pixels"], config["max_request_pixels"]) == (170 * 170, 60_000)
    model_sha = json.loads((logged["root"] / "model" / "run.json").read_text())["model_sha256"]
    assert config["keras_sha256"] == model_sha
    assert scoring.load_scoring_model(logged["registered"]).classes == CLASSES


def test_a_changed_keras_file_is_refused_before_keras_reads_it(logged: dict[str, Any], tmp_path: Path) -> None:
    local = Path(mlflow.artifacts.download_artifacts(logged["uri"], dst_path=str(tmp_path)))
    keras_file = next(local.rglob("model.keras"))
    keras_file.write_bytes(keras_file.read_bytes() + b"\0")
    with pytest.raises(Exception, match="sha256 differs"):
        mlflow.pyfunc.load_model(str(local))


def test_a_registered_pickled_pyfunc_is_refused(logged: dict[str, Any]) -> None:
    class Pickled(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run(experiment_id=logged["experiment"]):
        info = mlflow.pyfunc.log_model(name="old", python_model=Pickled(), pip_requirements=["mlflow"])
    version = registry.register_version("served", info.model_uri, {scoring.SHA256_TAG: "0" * 64})
    with pytest.raises(scoring.UnsafeModel, match="pickled pyfunc"):
        scoring.load_scoring_model(f"models:/served/{version}")


# --- batch scoring ------------------------------------------------------------------------------


def test_batch_prediction_scores_a_folder_and_records_unreadable_files(logged: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    coloured_images(folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = run_predict(logged["uri"], folder, tmp_path / "preds.csv", batch_size=2)

    table = pd.read_csv(out.out_csv, keep_default_na=False)
    assert list(table.columns[:3]) == ["path", "label", "probability"]
    assert out.n_images == 4 and out.n_failed == 1
    scored = table[table["error"] == ""]
    assert {Path(p).stem: label for p, label in zip(scored["path"], scored["label"])} == {c: c for c in CLASSES}
    assert table.loc[table["path"].str.endswith("broken.jpg"), "error"].item() == "not a usable image"


def test_batch_prediction_reads_a_manifest_split(logged: dict[str, Any], tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    out = run_predict(logged["uri"], manifest, tmp_path / "preds.csv", batch_size=8, split="test")
    table = pd.read_csv(out.out_csv)
    truth = pd.read_csv(manifest).query("split == 'test'")
    assert len(table) == len(truth)
    assert (table["label"].to_numpy() == truth["label"].to_numpy()).all()


def test_batch_prediction_refuses_files_outside_the_input_root(logged: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "batch"
    inside = coloured_images(root / "images")
    outside = write_image(tmp_path / "elsewhere" / "secret.png", color=COLORS[1], fmt="PNG")
    (root / "images" / "link.png").symlink_to(outside)  # a link that leads out of the root
    rows = [
        "images/alpha.png",
        str(inside["beta"]),
        str(outside),
        "../elsewhere/secret.png",
        "images/link.png",
        "/etc/passwd",
    ]
    (root / "batch.csv").write_text("path\n" + "\n".join(rows) + "\n")
    out = run_predict(logged["uri"], root / "batch.csv", tmp_path / "preds.csv")

    table = pd.read_csv(out.out_csv, keep_default_na=False)
    assert table["path"].tolist() == rows
    assert table["label"].tolist()[:2] == ["alpha", "beta"]
    assert table["error"].tolist() == ["", ""] + [predict.OUTSIDE_ROOT] * 4
    assert out.n_failed == 4


def test_a_root_given_on_the_command_line_widens_nothing_else(logged: dict[str, Any], tmp_path: Path) -> None:
    images = coloured_images(tmp_path / "data" / "raw")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.csv").write_text(f"path\ndata/raw/{images['gamma'].name}\n/etc/hostname\n")
    code = predict.main(
        [
            "--model",
            logged["uri"],
            "--inputs",
            str(tmp_path / "lists" / "a.csv"),
            "--root",
            str(tmp_path),
            "--out",
            str(tmp_path / "p.csv"),
            "--params",
            str(tmp_path / "none.yaml"),
        ]
    )
    assert code == 0
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert table["label"].tolist() == ["gamma", ""] and table["error"].tolist() == ["", predict.OUTSIDE_ROOT]


def test_cli_rejects_an_input_that_is_not_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    code = predict.main(
        [
            "--model",
            "models:/x@champion",
            "--inputs",
            str(tmp_path / "notes.txt"),
            "--out",
            str(tmp_path / "p.csv"),
            "--params",
            str(tmp_path / "none.yaml"),
        ]
    )
    assert code == 2
    assert "expected a folder of images" in capsys.readouterr().err


def test_batch_reads_are_confined_even_through_a_symlinked_root_entry(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/etc", root / "etc")
    assert predict.confine("etc/hostname", root) is None
    assert predict.confine(str(root / "x.png"), root) == (root / "x.png").resolve()


def test_the_served_predict_has_a_type_hint_mlflow_accepts_without_a_warning():
    import warnings

    from mlflow.pyfunc.utils.data_validation import _get_func_info_if_type_hint_supported

    from components.scoring.serving_model import ImageClassifier

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _get_func_info_if_type_hint_supported(ImageClassifier.predict) is None  # no schema derived
    assert [str(w.message) for w in caught if "type hint" in str(w.message).lower()] == []


def test_serving_and_batch_scoring_see_every_exif_orientation_upright(
    pyfunc: Any, logged: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the model is handed, per path: the served request's bytes and batch scoring's files, all upright."""
    from components.modeling.data import load_rgb
    from tests.datakit import assert_upright, save_encoded, upright_picture, write_oriented_images

    classifier = pyfunc.unwrap_python_model()  # the served code, loaded by MLflow as a module of its own
    seen: list[np.ndarray] = []

    def record(self: Any, batch: np.ndarray) -> np.ndarray:
        seen.extend(batch)
        return np.full((len(batch), len(self.classes)), 1 / len(self.classes), dtype=np.float32)

    monkeypatch.setattr(type(classifier), "_forward", record)
    monkeypatch.setattr(serving_model.ImageClassifier, "_forward", record)  # batch scoring: the installed code
    oriented = write_oriented_images(tmp_path / "in", "PNG")
    size = classifier.image_size
    reference = load_rgb(save_encoded(upright_picture(), tmp_path / "plain.png", "PNG"), size)
    raw = [path.read_bytes() for path in oriented.values()]
    for start in (0, 4):  # at most 5 images a request
        pyfunc.predict(pd.DataFrame({"image": raw[start : start + 4]}))
    run_predict(logged["uri"], tmp_path / "in", tmp_path / "p.csv", batch_size=3)
    assert len(seen) == 2 * len(oriented)
    for pixels in seen:
        assert_upright(pixels.astype(np.uint8), reference, tolerance=0)
