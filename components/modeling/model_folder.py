"""The model folder one training stage hands the next: model.keras, classes.json, run.json.

Written atomically; run.json (`contracts.ModelRunInfo`) records the model file's sha256, and the loader
refuses a file that no longer matches it before Keras reads a byte, then loads it in safe mode (no code
from the file runs). classes.json is a JSON list of the class names in the model's output order,
read and written through `ClassNames`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, RootModel, ValidationError

from components.core import files
from components.core.contracts import CLASSES_FILE, MODEL_FILE, RUN_INFO_FILE, ContractError, ModelRunInfo
from components.core.hashing import file_sha256


class ClassNames(RootModel[list[str]]):
    """classes.json: the class names, in the order of the model's outputs (a non-empty JSON list of strings)."""

    root: list[str] = Field(min_length=1)

    @classmethod
    def read(cls, path: str | Path) -> ClassNames:
        path = Path(path)
        try:
            raw = files.read_json(path)
        except FileNotFoundError:
            raise ContractError(f"{path} not found: run the training stages first") from None
        except (OSError, ValueError) as exc:
            raise ContractError(f"{path}: not readable as JSON ({exc})") from None
        try:
            return cls.model_validate(raw)
        except ValidationError:
            raise ContractError(f"{path}: expected a non-empty list of class names") from None

    def write(self, path: str | Path) -> Path:
        files.write_json(path, self.root)
        return Path(path)


@dataclass(frozen=True)
class ModelFolder:
    model: Any
    model_path: Path
    classes: list[str]
    info: ModelRunInfo

    @property
    def image_size(self) -> int:
        return self.info.image_size


def save_model_dir(model: Any, classes: list[str], info: dict[str, Any], out_dir: str | Path) -> Path:
    """Write a model folder atomically; run.json records the model file's sha256 for the loader to check."""
    with files.atomic_dir(out_dir) as tmp:
        model.save(tmp / MODEL_FILE)
        ClassNames(list(classes)).write(tmp / CLASSES_FILE)
        ModelRunInfo(**info, model_sha256=file_sha256(tmp / MODEL_FILE)).write(tmp / RUN_INFO_FILE)
    return Path(out_dir)


def read_model_info(model_dir: str | Path) -> tuple[list[str], ModelRunInfo]:
    """classes.json and run.json of a model folder, checked (no model loaded)."""
    model_dir = Path(model_dir)
    return ClassNames.read(model_dir / CLASSES_FILE).root, ModelRunInfo.read(model_dir / RUN_INFO_FILE)


def load_model_dir(model_dir: str | Path) -> ModelFolder:
    """A model folder, its model file checked against the sha256 in run.json, then loaded in safe mode."""
    model_dir = Path(model_dir)
    classes, info = read_model_info(model_dir)
    model = load_keras_model(model_dir / MODEL_FILE, expected_sha256=info.model_sha256)
    return ModelFolder(model, model_dir / MODEL_FILE, classes, info)


def load_keras_model(path: str | Path, expected_sha256: str | None = None) -> Any:
    """Load a project .keras file in safe mode, with the project's custom layers registered.

    With `expected_sha256`, a file that changed since it was recorded is refused before Keras reads it.
    """
    import keras

    import components.modeling.backbones  # noqa: F401  (registers CaffePreprocess and any other custom layer)

    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise ContractError(f"refused to load {path}: its sha256 differs from the one recorded when it was written")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)  # never run code from a file
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise
        raise ValueError(
            f"refused to load {path}: it holds Python code (e.g. a Lambda layer) that would run "
            "on loading. Only models built from registered layers are loaded; rebuild it without "
            "Lambda layers (register custom layers in components/modeling/backbones.py)."
        ) from None
