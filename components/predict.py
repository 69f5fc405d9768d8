"""Scoring raw images with a registered model: the MLflow pyfunc wrapper and batch prediction.

The pyfunc (`ImageClassifier`) is what evaluate logs and registers, what `mlflow models serve`
serves and what `run_predict` loads: a DataFrame column `image` of file paths, raw bytes or
base64 strings (any size, any Pillow-readable format) in; label, probability and per-class
probabilities out. It carries the Keras model file, so no training code is needed to use it.

CLI: python -m components.predict --model models:/image-classifier@champion --input DIR_OR_CSV --out preds.csv
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from components import runtime, files, errors
from components.data import load_keras_model, load_rgb

IMAGE_COLUMN = "image"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _image_source(value: Any) -> Any:
    """What Pillow should open for one cell: a path, or the bytes behind raw/base64 input."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value))
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a file path, raw bytes or a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:  # data:image/jpeg;base64,....
        text = text.split(",", 1)[1]
    if len(text) < 1024 and Path(text).is_file():  # short strings may be paths; base64 images are long
        return Path(text)
    try:
        return io.BytesIO(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise ValueError(f"{text[:60]!r} is neither an existing file nor base64 image data") from None


def decode_images(values: list[Any], size: int, first_row: int = 0) -> np.ndarray:
    """A (n, size, size, 3) float32 batch in 0..255, the model's input contract."""
    batch = np.empty((len(values), size, size, 3), dtype=np.float32)
    for i, value in enumerate(values):
        try:
            batch[i] = load_rgb(_image_source(value), size)
        except Exception as exc:  # name the row: a served request may hold many images
            raise ValueError(f"image row {first_row + i}: {exc}") from None
    return batch


def probabilities_frame(probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """label, probability and a {class: probability} mapping per row."""
    top = probs.argmax(axis=1)
    return pd.DataFrame({
        "label": [classes[i] for i in top],
        "probability": probs[np.arange(len(top)), top].astype(float),
        "probabilities": [dict(zip(classes, map(float, row))) for row in probs],
    })


def image_values(model_input: Any) -> list[Any]:
    """The images of a request: DataFrame (`dataframe_split`/`records`), dict (`inputs`), list or one value."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        if IMAGE_COLUMN not in model_input:
            found = list(model_input.columns if isinstance(model_input, pd.DataFrame) else model_input)
            raise ValueError(f"input needs a column {IMAGE_COLUMN!r}, got {found}")
        column = model_input[IMAGE_COLUMN]
        values = column.tolist() if hasattr(column, "tolist") else list(column)
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        values = list(model_input)
    else:
        values = [model_input]
    # `{"inputs": {"image": [a, b]}}` arrives as one row holding the list: unpack it.
    return [item for value in values
            for item in (list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value])]


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Raw images in, labels out; artifacts: `keras_model` (a .keras file) and `classes` (JSON list)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = load_keras_model(context.artifacts["keras_model"])
        self.classes = files.read_json(context.artifacts["classes"])
        self.image_size = int((context.model_config or {}).get("image_size", 224))
        self.batch_size = int((context.model_config or {}).get("batch_size", 32))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probs = self.predict_proba(image_values(model_input))
        return probabilities_frame(probs, self.classes)

    def predict_proba(self, values: list[Any]) -> np.ndarray:
        if not values:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        parts = []
        for start in range(0, len(values), self.batch_size):  # decode batch by batch: bounded memory
            batch = decode_images(values[start:start + self.batch_size], self.image_size, start)
            parts.append(np.asarray(self.model.predict_on_batch(batch), dtype=np.float32))
        return np.concatenate(parts)


# --- batch prediction -------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictResult:
    out_csv: Path
    n_images: int
    n_failed: int


def list_inputs(inputs: str | Path, split: str | None = None) -> list[str]:
    """Image paths from a folder (recursive) or a manifest CSV with a `path` column."""
    inputs = Path(inputs)
    if inputs.is_dir():
        return sorted(str(p) for p in inputs.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if inputs.is_file() and inputs.suffix.lower() == ".csv":
        frame = pd.read_csv(inputs, keep_default_na=False)
        if "path" not in frame.columns:
            raise ValueError(f"{inputs}: a CSV input needs a 'path' column")
        if split is not None and "split" in frame.columns:
            frame = frame[frame["split"] == split]
        return frame["path"].astype(str).tolist()
    raise ValueError(f"{inputs}: expected a folder of images or a CSV with a 'path' column")


def _score_batch(model: Any, paths: list[str]) -> pd.DataFrame:
    """Score a batch; on a bad file, fall back to one by one so one image cannot sink the rest."""
    try:
        scored = model.predict(pd.DataFrame({IMAGE_COLUMN: paths}))
        return scored[["label", "probability"]].assign(path=paths, error="")
    except Exception:
        rows = []
        for path in paths:
            try:
                one = model.predict(pd.DataFrame({IMAGE_COLUMN: [path]})).iloc[0]
                rows.append({"path": path, "label": one["label"], "probability": float(one["probability"]), "error": ""})
            except Exception as exc:
                rows.append({"path": path, "label": "", "probability": float("nan"), "error": str(exc)})
        return pd.DataFrame(rows)


def run_predict(model_uri: str, inputs: str | Path, out_csv: str | Path, batch_size: int = 64,
                split: str | None = None) -> PredictResult:
    """Score every image under `inputs` with `model_uri` (e.g. models:/NAME@champion) into a CSV.

    Columns: path, label, probability, error ('' or why that image could not be scored).
    """
    from tqdm import tqdm

    paths = list_inputs(inputs, split)
    if not paths:
        raise ValueError(f"{inputs}: no images found")
    model = mlflow.pyfunc.load_model(model_uri)
    parts = []
    with tqdm(total=len(paths), unit="img", desc="predict") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            parts.append(_score_batch(model, chunk))
            bar.update(len(chunk))
    table = pd.concat(parts, ignore_index=True)[["path", "label", "probability", "error"]]
    with files.atomic_file(out_csv) as fh:
        table.to_csv(fh, index=False)
    return PredictResult(Path(out_csv), len(table), int((table["error"] != "").sum()))


@errors.cli_errors("predict")
def main(argv: list[str] | None = None) -> int:
    from components.config import ParamsError, load_params
    from components.tracking import resolve_tracking_uri, shown_uri, use_tracking_uri

    parser = argparse.ArgumentParser(description="Score a folder or manifest of images with a registered model.")
    parser.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/image-classifier@champion")
    parser.add_argument("--input", required=True, help="folder of images or CSV with a 'path' column")
    parser.add_argument("--out", required=True, help="output CSV: path, label, probability, error")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--split", default=None, help="with a manifest CSV: only this split")
    parser.add_argument("--params", default="params.yaml", help="for the tracking URI (MLFLOW_TRACKING_URI wins)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params) if Path(args.params).exists() else None
        uri = resolve_tracking_uri(params.tracking) if params else None
        if uri:
            use_tracking_uri(uri)
        result = run_predict(args.model, args.input, args.out, args.batch_size, args.split)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 2
    except mlflow.exceptions.MlflowException as exc:
        where = shown_uri()
        print(f"predict: could not load {args.model} from {where}: {exc.message}", file=sys.stderr)
        return 2
    print(f"wrote {result.out_csv}: {result.n_images} images, {result.n_failed} could not be scored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
