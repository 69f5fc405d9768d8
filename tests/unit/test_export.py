"""Export: SavedModel + float16 TFLite that answer like the Keras model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components import export
from tests.evalkit import make_model_dir, write_manifest


@pytest.mark.parametrize("tta", ["off", "flip", "crop"], ids=["single-view", "flip-tta", "crop-tta"])
def test_tflite_export_agrees_with_keras_and_reports_it(tmp_path: Path, tta: str) -> None:
    model_dir = make_model_dir(tmp_path / "model", flip_tta=tta == "flip", crop_tta=tta == "crop")
    manifest = write_manifest(tmp_path)
    code = export.main(
        [
            "--model-dir",
            str(model_dir),
            "--out-dir",
            str(tmp_path / "export"),
            "--manifest",
            str(manifest),
            "--split",
            "test",
            "--samples",
            "6",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "export" / "export.json").read_text())
    assert report["n_samples"] == 6
    assert report["top1_agreement"] == 1.0 and report["max_prob_diff"] < 0.01
    assert (tmp_path / "export" / "saved_model" / "saved_model.pb").is_file()
    assert (tmp_path / "export" / "model_float16.tflite").stat().st_size == report["tflite_bytes"]
