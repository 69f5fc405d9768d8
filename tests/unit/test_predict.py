"""The logged pyfunc scores raw images in every accepted form; batch prediction writes a CSV."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest

from components import predict
from components.evaluate import example_input, load_model_dir, log_pyfunc
from components.predict import run_predict
from tests.conftest import COLORS, write_image
from tests.evalkit import CLASSES, make_model_dir, write_manifest


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pyfunc evaluate logs, for a perfect colour model, in a throwaway sqlite store."""
    root = tmp_path_factory.mktemp("predict")
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    experiment = mlflow.create_experiment("predict-tests", artifact_location=(root / "mlruns").as_uri())
    bundle = load_model_dir(make_model_dir(root / "model"), 224)
    image = write_image(root / "example.jpg")
    with mlflow.start_run(experiment_id=experiment):
        info = log_pyfunc(bundle, example_input(str(image)), batch_size=4)
    yield info.model_uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def pyfunc(logged_model: str) -> Any:
    return mlflow.pyfunc.load_model(logged_model)


def coloured_images(root: Path) -> dict[str, Path]:
    """One image per class, each a different size (the pyfunc must accept any size)."""
    return {name: write_image(root / f"{name}.png", size=(30 + 40 * c, 50 + 10 * c), color=COLORS[c], seed=c, fmt="PNG")
            for c, name in enumerate(CLASSES)}


def test_pyfunc_labels_raw_bytes_paths_and_base64(pyfunc: Any, tmp_path: Path) -> None:
    images = coloured_images(tmp_path)
    raw = [p.read_bytes() for p in images.values()]
    forms = {
        "paths": [str(p) for p in images.values()],
        "bytes": raw,
        "base64": [base64.b64encode(b).decode() for b in raw],
        "data uri": ["data:image/png;base64," + base64.b64encode(b).decode() for b in raw],
    }
    for form, values in forms.items():
        out = pyfunc.predict(pd.DataFrame({"image": values}))
        assert out["label"].tolist() == CLASSES, form
        assert (out["probability"] > 0.9).all(), form
        assert set(out["probabilities"].iloc[0]) == set(CLASSES), form


def test_pyfunc_names_the_row_it_cannot_read(pyfunc: Any, tmp_path: Path) -> None:
    good = coloured_images(tmp_path)["alpha"]
    with pytest.raises(Exception, match="row 1"):
        pyfunc.predict(pd.DataFrame({"image": [str(good), "not an image"]}))


def test_batch_prediction_scores_a_folder_and_records_unreadable_files(logged_model: str, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    coloured_images(folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = run_predict(logged_model, folder, tmp_path / "preds.csv", batch_size=2)

    table = pd.read_csv(out.out_csv, keep_default_na=False)
    assert list(table.columns[:3]) == ["path", "label", "probability"]
    assert out.n_images == 4 and out.n_failed == 1
    scored = table[table["error"] == ""]
    assert {Path(p).stem: label for p, label in zip(scored["path"], scored["label"])} == {c: c for c in CLASSES}
    assert table.loc[table["path"].str.endswith("broken.jpg"), "error"].item() != ""


def test_batch_prediction_reads_a_manifest_split(logged_model: str, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    out = run_predict(logged_model, manifest, tmp_path / "preds.csv", batch_size=8, split="test")
    table = pd.read_csv(out.out_csv)
    truth = pd.read_csv(manifest).query("split == 'test'")
    assert len(table) == len(truth)
    assert (table["label"].to_numpy() == truth["label"].to_numpy()).all()


def test_cli_rejects_an_input_that_is_not_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    code = predict.main(["--model", "models:/x@champion", "--input", str(tmp_path / "notes.txt"),
                         "--out", str(tmp_path / "p.csv"), "--params", str(tmp_path / "none.yaml")])
    assert code == 2
    assert "expected a folder of images" in capsys.readouterr().err
