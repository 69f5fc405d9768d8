"""The served model: image data in, labels out. Logged as MLflow "models from code", never pickled.

`components.lifecycle.model_packaging.log_pyfunc` logs this file as the pyfunc's code (MLflow runs it on loading,
so `set_model` at the bottom names the model object); the Keras file travels as an artifact
whose sha256 is in the model's `model_config` and is checked before Keras reads the file.

When evaluate scored with ONNX Runtime, the ONNX file it checked against Keras travels too
(`onnx_model`, sha256 `onnx_sha256` in model_config) and is checked the same way before ONNX
Runtime reads it. It serves where onnxruntime imports and no accelerator is visible; otherwise
(or for a model logged without it) Keras serves. `self.engine` says which. The Keras file stays the
source of truth: it is always loaded and verified, and the ONNX file is only ever a faster copy of it.

Input: a column `image` of raw bytes, base64 strings or `data:` URIs (base64), nothing else.
A string is never treated as a file name: "/etc/passwd" is simply not valid image data, and
gets the same error as every other unusable input. Every image is decoded by
`components.ingestion.images.decode_rgb` within the limits stored in `model_config` (so the server enforces
them without params.yaml): images per request, bytes per request, bytes and pixels per image (the
serving cap `serving_max_pixels`, smaller than training's), decoded pixels per request
(`max_request_pixels`), and the allowed formats. Models logged before the two serving keys existed
serve with their training pixel cap and no per-request budget.

A refused request or image raises a `ServingError`, an `MlflowException`: MLflow's scoring server
answers it with HTTP 400 and our message alone (any other exception gets its traceback attached).

This file is the model's code only where MLflow loads it (`python -m components.serve`, after the
whole model folder is verified). The pipeline's own processes never run the stored copy:
`components.scoring.scoring` builds an `ImageClassifier` from the installed code and calls `load` on the
version's verified data files.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from components.core import runtime
from components.core.contracts import ContractError
from components.ingestion.images import GENERIC_MESSAGE, ImageLimits, UnusableImage, decode_rgb
from components.modeling import onnx_inference
from components.modeling.model_folder import ClassNames, load_keras_model

IMAGE_COLUMN = "image"
# model_config keys (written by model_packaging.serving_model_config, read here)
CONFIG_KEYS = (
    "image_size",
    "batch_size",
    "keras_sha256",
    "max_images_per_request",
    "max_request_bytes",
    "max_image_bytes",
    "max_pixels",
    "allowed_formats",
)
# Written for every model since serving got its own pixel limits; models logged before load without them.
SERVING_PIXEL_KEYS = ("serving_max_pixels", "max_request_pixels")
# Only on models that carry an ONNX file.
ONNX_CONFIG_KEYS = ("onnx_sha256", "serving_engine")
# Keys a model may carry; models logged before they existed load without them.
OPTIONAL_CONFIG_KEYS = (*ONNX_CONFIG_KEYS, *SERVING_PIXEL_KEYS)
ONNX_ARTIFACT = "onnx_model"
# serving_engine: auto (ONNX Runtime where it can run, Keras otherwise) | keras | onnxruntime (insist). Logged as
# auto; MLflow lets a loader override a logged key (MLFLOW_PYFUNC_INFERENCE_CONFIG='{"serving_engine": "keras"}'
# or load_model(..., model_config=...)), which is how Keras is forced without re-logging the model.
SERVING_ENGINES = ("auto", "keras", "onnxruntime")


_logger = logging.getLogger(__name__)


class ServingError(MlflowException, ValueError):
    """What a caller is told, and nothing else: MLflow's scoring server serialises an MlflowException
    raised by `predict` as {error_code, message} (no stack trace; HTTP 400 for INVALID_PARAMETER_VALUE).

    The server rewrites an MlflowException's `message` to start with the request's own data
    (`Failed to predict data '<the frame>'`), which would echo the request and make two unusable
    images answer differently: `message` is fixed when the error is made. Still a ValueError, so our
    own callers (batch scoring) catch it as before."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._fixed_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_fixed_message"):  # MlflowException.__init__ sets it once; later rewrites are ignored
            self._fixed_message = value


class RequestRejected(ServingError):
    """A request over a per-request limit (too many images, bytes or decoded pixels, no image column)."""


class UnusableRow(ServingError):
    """One row is not a usable image; the message names only the row, never the cause."""

    def __init__(self, row: int, reason: str = "") -> None:
        super().__init__(f"image row {row}: {GENERIC_MESSAGE}")
        self.row = row
        self.reason = reason  # for our own logs and reports, never the caller


class ScoringFailed(ServingError):
    """Anything else that went wrong while scoring: logged on the server, one fixed sentence for the caller."""

    def __init__(self) -> None:
        super().__init__("the model could not score this request", error_code=INTERNAL_ERROR)


class PixelBudget:
    """Decoded pixels left for one request; charged from each image's header, before it is decoded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def charge(self, pixels: int) -> None:
        self.left -= pixels
        if self.left < 0:
            raise RequestRejected(f"a request may decode at most {self.limit} pixels of images in all")


@dataclass(frozen=True)
class ServingLimits:
    max_images: int
    max_request_bytes: int
    image: ImageLimits  # per image; its pixel cap is serving's own (the training cap for older models)
    max_request_pixels: int | None = None  # decoded pixels per request; None for models logged before it

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> ServingLimits:
        budget = config.get("max_request_pixels")
        return cls(
            int(config["max_images_per_request"]),
            int(config["max_request_bytes"]),
            ImageLimits(
                int(config["max_image_bytes"]),
                int(config.get("serving_max_pixels") or config["max_pixels"]),
                tuple(str(f).upper() for f in config["allowed_formats"]),
            ),
            int(budget) if budget else None,
        )


def image_bytes(value: Any, max_bytes: int) -> bytes:
    """The image data in one cell: raw bytes as they are, a base64 string or data: URI decoded."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:  # data:image/jpeg;base64,....
            text = text.split(",", 1)[1]
        if len(text) > 4 * (max_bytes // 3 + 2):  # refuse before decoding what could not fit the cap
            raise UnusableImage(f"base64 text longer than the {max_bytes}-byte cap allows")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise UnusableImage("not base64") from None
    else:
        raise UnusableImage(f"unsupported value type {type(value).__name__}")
    if len(data) > max_bytes:
        raise UnusableImage(f"more than {max_bytes} bytes")
    return data


def request_values(model_input: Any) -> list[Any]:
    """The images of a request: DataFrame (`dataframe_split`/`records`), dict (`inputs`), list or one value."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        if IMAGE_COLUMN not in model_input:
            raise RequestRejected(f"input needs a column {IMAGE_COLUMN!r}")
        column = model_input[IMAGE_COLUMN]
        values = column.tolist() if hasattr(column, "tolist") else list(column)
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        values = list(model_input)
    else:
        values = [model_input]
    # `{"inputs": {"image": [a, b]}}` arrives as one row holding the list: unpack it.
    return [
        item for value in values for item in (list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value])
    ]


def request_images(values: list[Any], limits: ServingLimits) -> list[bytes]:
    """The raw bytes of every image in a request, within the request's count and byte limits."""
    if len(values) > limits.max_images:
        raise RequestRejected(f"a request may hold at most {limits.max_images} images, got {len(values)}")
    images, total = [], 0
    for row, value in enumerate(values):
        try:
            data = image_bytes(value, limits.image.max_bytes)
        except UnusableImage as exc:
            raise UnusableRow(row, exc.reason) from None
        total += len(data)
        if total > limits.max_request_bytes:
            raise RequestRejected(f"a request may hold at most {limits.max_request_bytes} bytes of image data")
        images.append(data)
    return images


def probabilities_frame(probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """label, probability and a {class: probability} mapping per row."""
    top = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    return pd.DataFrame(
        {
            "label": [classes[i] for i in top],
            "probability": probs[np.arange(len(top)), top].astype(float),
            "probabilities": [dict(zip(classes, map(float, row))) for row in probs],
        }
    )


def onnx_session(artifacts: dict[str, str], config: dict[str, Any]) -> Any | None:
    """An ONNX Runtime session over the model's verified ONNX file, or None where Keras should serve.

    The hash is checked whenever the model carries the file, on any machine: a changed file is
    refused even where Keras would have served, so a tampered model fails everywhere alike.
    """
    path, expected = artifacts.get(ONNX_ARTIFACT), config.get("onnx_sha256")
    wanted = str(config.get("serving_engine") or "auto")
    if wanted not in SERVING_ENGINES:
        raise ValueError(f"serving_engine = {wanted!r}: expected one of {', '.join(SERVING_ENGINES)}")
    if not path or not expected:
        if wanted == "onnxruntime":
            raise ValueError("serving_engine: onnxruntime, but this model was logged without an ONNX file")
        return None  # logged before ONNX, or scored by Keras: there is no file we could trust
    try:
        data = onnx_inference.verified_bytes(path, str(expected))
    except onnx_inference.OnnxFileChanged as exc:
        raise ContractError(str(exc)) from None
    blocker = (
        "serving_engine: keras"
        if wanted == "keras"
        else "onnxruntime is not installed"
        if not onnx_inference.runtime_available()
        else "an accelerator is present"
        if runtime.accelerator_present()
        else None
    )
    if blocker is None:
        return onnx_inference.cpu_session(data)
    if wanted == "onnxruntime":
        raise ValueError(f"serving_engine: onnxruntime, but {blocker}")
    return None


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Artifacts: `keras_model` (.keras, sha256 in model_config), `classes` (JSON list) and, optionally,
    `onnx_model` (sha256 `onnx_sha256` in model_config)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.load(dict(context.artifacts), dict(context.model_config or {}))

    def load(self, artifacts: dict[str, str], config: dict[str, Any]) -> ImageClassifier:
        """Load from the artifact files and model_config (MLflow's loader, or components.scoring.scoring with
        the installed code)."""
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"model_config lacks {missing}: this model was not logged by this project's registry")
        # Refused before Keras reads a byte if the file is not the one recorded at registration.
        self.model = load_keras_model(artifacts["keras_model"], expected_sha256=str(config["keras_sha256"]))
        self.session = onnx_session(artifacts, config)
        self.engine = "keras" if self.session is None else "onnxruntime"
        self.classes = ClassNames.read(artifacts["classes"]).root
        self.image_size = int(config["image_size"])
        self.batch_size = int(config["batch_size"])
        self.limits = ServingLimits.from_model_config(config)
        return self

    # MLflow's schema enforcement (the logged signature: one AnyType column) hands predict a DataFrame.
    # DataFrame is a hint MLflow derives no schema from, so it validates nothing more and stops warning
    # at every import; request_values still takes the dicts and lists a direct caller may pass.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            images = request_images(request_values(model_input), self.limits)
            budget = PixelBudget(self.limits.max_request_pixels) if self.limits.max_request_pixels else None
            return probabilities_frame(self.score(images, budget=budget), self.classes)
        except ServingError:
            raise
        except Exception:
            _logger.exception("scoring a request failed")  # the server's log has the trace; the caller does not
            raise ScoringFailed() from None

    def score(
        self, images: list[bytes], limits: ImageLimits | None = None, budget: PixelBudget | None = None
    ) -> np.ndarray:
        """Class probabilities (columns in `self.classes` order) for raw image bytes, batch by batch.

        Decoded within `limits` (default: the served ones stored with the model) and, given a budget,
        within its pixels for all of `images` together."""
        limits = limits or self.limits.image
        charge = budget.charge if budget else None
        if not images:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        parts = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = np.empty((len(chunk), self.image_size, self.image_size, 3), dtype=np.float32)
            for i, data in enumerate(chunk):
                try:
                    batch[i] = decode_rgb(data, self.image_size, limits, charge=charge)
                except UnusableImage as exc:
                    raise UnusableRow(start + i, exc.reason) from None
            parts.append(self._forward(batch))
        return np.concatenate(parts)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        if self.session is not None:
            return onnx_inference.run_session(self.session, batch)
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)


mlflow.models.set_model(ImageClassifier())
