"""Packaging the served model: MLflow "models from code", never a pickle.

The pyfunc's code is `components/scoring/serving_model.py` with a copy of just the `components` modules it
imports; the Keras file travels as an artifact (and the ONNX file too, when evaluate scored with ONNX
Runtime), each file's sha256 in the model_config it is logged with. Registration then records those
hashes and the digest of the whole logged folder (`components.scoring.scoring`) on the registered version.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from components.core.config import Params
from components.ingestion.images import ImageLimits
from components.modeling.data import load_rgb
from components.modeling.model_folder import ClassNames
from components.scoring.scoring import ONNX_SHA256_TAG, UnsafeModel
from components.scoring.serving_model import CONFIG_KEYS, ONNX_ARTIFACT, OPTIONAL_CONFIG_KEYS, SERVING_PIXEL_KEYS

PYFUNC_NAME = "model"
COMPONENTS_ROOT = Path(__file__).resolve().parents[1]  # the installed `components` package
SERVING_MODEL = COMPONENTS_ROOT / "scoring" / "serving_model.py"


def pyfunc_requirements() -> list[str]:
    """Pinned from this environment: inferring them is slow and lists both tensorflow wheels."""
    wanted = ["mlflow", "keras", "pillow", "numpy", "pandas", "pydantic", "pyyaml"]
    for tf_dist in ("tensorflow-cpu", "tensorflow"):
        if _installed(tf_dist):
            wanted.insert(0, tf_dist)
            break
    if _installed("onnxruntime"):  # runs the ONNX file; the model still serves with Keras without it
        wanted.append("onnxruntime")
    return [f"{name}=={metadata.version(name)}" for name in wanted]


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def code_closure(module_file: Path) -> set[str]:
    """Paths (relative to `components/`) of the modules `module_file` imports anywhere in it, transitively,
    with the `__init__.py` of every package on the way (importing a.b runs a/__init__.py first)."""
    seen: set[str] = set()
    start = module_file.relative_to(COMPONENTS_ROOT)
    todo = [start.as_posix(), *((parent / "__init__.py").as_posix() for parent in start.parents)]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imported_files((COMPONENTS_ROOT / name).read_text(encoding="utf-8"))
    return seen


def _imported_files(source: str) -> list[str]:
    """The files under components/ that one module's imports (lazy ones too) load, packages included."""
    dotted: list[list[str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "components":
            base = node.module.split(".")[1:]
            dotted += [base, *(base + [alias.name] for alias in node.names)]
        elif isinstance(node, ast.Import):
            dotted += [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "components"]
    found = []
    for parts in dotted:
        for end in range(1, len(parts) + 1):
            stem = "/".join(parts[:end])
            found += [f for f in (f"{stem}.py", f"{stem}/__init__.py") if (COMPONENTS_ROOT / f).is_file()]
    return found


def code_package(tmp: Path) -> Path:
    """A copy of just the modules the served model imports, as a `components` package (its layers kept)."""
    package = tmp / "components"
    for name in sorted(code_closure(SERVING_MODEL)):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_bytes((COMPONENTS_ROOT / name).read_bytes())
    return package


def serving_model_config(
    params: Params, image_size: int, keras_sha256: str, onnx_sha256: str | None = None
) -> dict[str, Any]:
    """What the served model needs at load time, with every limit it enforces on requests (and, given the
    sha256 of the ONNX file evaluate scored with, that file's hash: the served model may run it then)."""
    config = {
        "image_size": int(image_size),
        "batch_size": params.evaluate.batch_size,
        "keras_sha256": keras_sha256,
        "max_images_per_request": params.evaluate.serving.max_images_per_request,
        "max_request_bytes": params.evaluate.serving.max_request_bytes,
        "max_image_bytes": params.validate.max_image_bytes,
        "max_pixels": params.validate.max_pixels,
        "allowed_formats": [f.upper() for f in params.validate.allowed_formats],
        # serving's own, smaller caps (never above the training cap)
        "serving_max_pixels": min(params.evaluate.serving.max_pixels, params.validate.max_pixels),
        "max_request_pixels": params.evaluate.serving.max_request_pixels,
    }
    assert set(config) == {*CONFIG_KEYS, *SERVING_PIXEL_KEYS}, "serving_model's key lists and this function disagree"
    if onnx_sha256:
        config.update({"onnx_sha256": onnx_sha256, "serving_engine": "auto"})
        assert set(config) - set(CONFIG_KEYS) <= set(OPTIONAL_CONFIG_KEYS), "serving_model.OPTIONAL_CONFIG_KEYS"
    return config


def example_input(path: str, limits: ImageLimits, size: int = 64) -> pd.DataFrame:
    """One small test image as base64 JPEG: the request shape `mlflow models serve` expects."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(load_rgb(path, size, limits)).save(buffer, "JPEG", quality=85)
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})


def log_pyfunc(
    model_path: Path, classes: list[str], model_config: dict[str, Any], example: Any, onnx_path: Path | None = None
) -> Any:
    """Log the served model into the active run: code from serving_model.py, the .keras file as an artifact,
    and the ONNX file too when given (its sha256 must be model_config's `onnx_sha256`)."""
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Map, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]),  # raw bytes or base64 (data: URIs too); never a path
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "probability"),
                ColSpec(Map(DataType.double), "probabilities"),
            ]
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        # Checked like a model folder's classes.json; written compact, as the served models always had it.
        (Path(tmp) / "classes.json").write_text(json.dumps(ClassNames(classes).root), encoding="utf-8")
        artifacts = {"keras_model": str(model_path), "classes": str(Path(tmp) / "classes.json")}
        if onnx_path is not None:
            artifacts[ONNX_ARTIFACT] = str(_checked_copy(onnx_path, str(model_config.get(ONNX_SHA256_TAG)), Path(tmp)))
        return mlflow.pyfunc.log_model(
            name=PYFUNC_NAME,
            python_model=str(SERVING_MODEL),
            artifacts=artifacts,
            code_paths=[str(code_package(Path(tmp)))],
            model_config=model_config,
            signature=signature,
            input_example=example,
            pip_requirements=pyfunc_requirements(),
            metadata={"classes": classes, "image_size": model_config["image_size"]},
        )


def _checked_copy(onnx_path: Path, expected_sha256: str, tmp: Path) -> Path:
    """A private copy of the ONNX file, hashed after copying: what is logged is the file that was checked
    against Keras, even if the shared cache folder changes while the model uploads."""
    from components.core.hashing import file_sha256

    copy = tmp / "model.onnx"
    copy.write_bytes(Path(onnx_path).read_bytes())
    if file_sha256(copy) != expected_sha256:
        raise UnsafeModel(f"{onnx_path}: its sha256 is not the one model_config records (onnx_sha256): not logged")
    return copy
