"""Registered models, verified: our own processes score them with the INSTALLED code, never the stored code.

A registered version's folder holds code (`serving_model.py`, `code/components/*`) next to its data
files. An artifact-store writer can change any of them, and only the registry's tags are out of
their reach. So:

- At registration, evaluate records `model_tree_sha256`, the digest of every file of the logged model
  folder (relative path and sha256, MLmodel included), as a version tag (`logged_tree_digest`). It is
  computed from the logged artifacts right after logging: the store is trusted for that moment only.
- Champion re-scoring and batch scoring (`load_scoring_model`) download the version, check that
  digest (when the version has one), refuse pickles and Keras/ONNX hashes other than the version's
  tags, and then build `serving_model.ImageClassifier` from the code installed here, reading only data:
  the Keras and ONNX files (each checked against its sha256), classes.json and the model_config parsed
  from MLmodel with yaml.safe_load. `mlflow.pyfunc.load_model` is never called on a downloaded folder,
  so no stored module is imported, and a champion registered under an older module layout is still
  re-scored after a move.
- Versions registered before `model_tree_sha256` existed are scored the same way, with the Keras/ONNX
  checks and a cross-check of classes.json against the model's output width. What cannot be verified
  for them (the class names and their order, model_config's batch and image size) is printed.
- Serving runs the stored code: `components.serve` refuses a version without the digest or whose
  folder differs from it, before MLflow imports anything from it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from components.core.hashing import file_sha256
from components.core.tracking_connection import RetryPolicy, with_retries
from components.ingestion.images import ImageLimits

SHA256_TAG = "keras_sha256"
ONNX_SHA256_TAG = "onnx_sha256"  # on versions whose served model carries an ONNX file (also its model_config key)
TREE_SHA256_TAG = "model_tree_sha256"  # every file of the logged model folder, recorded at registration
VERIFYING_TAGS = (SHA256_TAG, ONNX_SHA256_TAG, TREE_SHA256_TAG)
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # the pyfunc loader of models logged from code
# Written by the MLflow client into every local download of `models:/...` (name and version): never from the store.
CLIENT_WRITTEN = frozenset({"registered_model_meta"})


class UnsafeModel(ValueError):
    """A logged model this project will not load: pickled, or a file changed since registration."""


# --- the model folder's digest ------------------------------------------------------------------------


def tree_digest(folder: str | Path) -> str:
    """sha256 over every file's relative path and sha256 (sorted); links and special files are refused."""
    folder = Path(folder)
    entries = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if relative in CLIENT_WRITTEN:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise UnsafeModel(f"the model folder holds {relative!r}, which is not a regular file or folder")
        if path.is_file():
            entries.append([relative, file_sha256(path)])
    canonical = json.dumps(sorted(entries), separators=(",", ":"))  # JSON: no file name can forge an entry
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def logged_tree_digest(model_uri: str, policy: RetryPolicy = RetryPolicy.default()) -> str:
    """The digest of a just-logged model as the artifact store now holds it (taken right after logging and
    recorded on the version: the store is trusted for that moment, and the tag is checked ever after)."""
    with tempfile.TemporaryDirectory(prefix="tp-logged-") as tmp:
        return tree_digest(_download(model_uri, Path(tmp), policy))


def verify_tree(local: Path, expected: str) -> None:
    if tree_digest(local) != expected:
        raise UnsafeModel(
            f"the model's files differ from those recorded at registration ({TREE_SHA256_TAG}): "
            "a file was added, removed or changed in the artifact store; it is not loaded"
        )


# --- the registry's tags, the checks --------------------------------------------------------------


def registered_version(model_uri: str, policy: RetryPolicy = RetryPolicy.default()) -> tuple[str, dict[str, str]]:
    """(`models:/NAME/VERSION` with any alias resolved once, that version's verifying tags: Keras, ONNX if any,
    model tree if any); other URIs as given, {}."""
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/"):
        return model_uri, {}
    name, _, ref = model_uri[len("models:/") :].rstrip("/").partition("/")
    client = MlflowClient()
    if "@" in name and not ref:
        name, alias = name.split("@", 1)
        found = with_retries("read the model version", client.get_model_version_by_alias, name, alias, policy=policy)
    elif ref:
        found = with_retries("read the model version", client.get_model_version, name, ref, policy=policy)
    else:
        return model_uri, {}  # models:/<logged model id>: no registry tag (its model_config hash is still checked)
    if not found.tags.get(SHA256_TAG):
        raise UnsafeModel(f"{model_uri} has no {SHA256_TAG} tag: not registered by this pipeline")
    return f"models:/{name}/{found.version}", {k: found.tags[k] for k in VERIFYING_TAGS if k in found.tags}


def check_logged_model(
    local_dir: str | Path, expected_sha256: str | None = None, expected_onnx_sha256: str | None = None
) -> dict[str, Any]:
    """The pyfunc flavor of a downloaded model, refused if it holds a pickle or a changed Keras hash.

    For a registered version (`expected_sha256` given) the ONNX hash in model_config must also be the
    version's tag (neither present on models logged without an ONNX file). The files themselves are
    checked against model_config when they are loaded, before anything reads them."""
    local_dir = Path(local_dir)
    conf = yaml.safe_load((local_dir / "MLmodel").read_text(encoding="utf-8")) or {}
    pyfunc = (conf.get("flavors") or {}).get("python_function") or {}
    pickles = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.suffix in {".pkl", ".pickle"})
    if "python_model" in pyfunc or pyfunc.get("loader_module") != CODE_LOADER or pickles:
        raise UnsafeModel(f"{local_dir.name}: a pickled pyfunc (logged before models-from-code); it is not loaded")
    config = pyfunc.get("config") or {}  # the model_config it was logged with
    recorded = config.get(SHA256_TAG)
    if not recorded or (expected_sha256 and recorded != expected_sha256):
        raise UnsafeModel("the model's Keras sha256 differs from the one recorded at registration")
    if expected_sha256 and config.get(ONNX_SHA256_TAG) != expected_onnx_sha256:
        raise UnsafeModel("the model's ONNX sha256 differs from the one recorded at registration")
    return pyfunc


def download_verified(
    model_uri: str, dst: Path, policy: RetryPolicy = RetryPolicy.default(), require_tree: bool = False
) -> tuple[Path, dict[str, str], str]:
    """(local folder, the version's tags, what was verified): downloaded into `dst`, its tree digest checked
    when the version has one (required with `require_tree`), pickles and changed Keras/ONNX hashes refused."""
    fixed_uri, tags = registered_version(model_uri, policy)
    if require_tree and TREE_SHA256_TAG not in tags:
        raise UnsafeModel(
            f"{model_uri} has no {TREE_SHA256_TAG} tag (not a registered version, or registered before the "
            "whole model folder was recorded): its code cannot be verified, so it is not served"
        )
    local = _download(fixed_uri, dst, policy)
    if TREE_SHA256_TAG in tags:
        verify_tree(local, tags[TREE_SHA256_TAG])
        verified = "every file of the model folder"
    elif tags:
        verified = (
            f"the Keras/ONNX files only: registered before {TREE_SHA256_TAG}, so its class names and their "
            "order and its model_config (batch and image size) are unverified"
        )
    else:
        verified = "nothing against the registry (not a registered version): model_config's own hashes only"
    check_logged_model(local, tags.get(SHA256_TAG), tags.get(ONNX_SHA256_TAG))
    return local, tags, verified


def _download(model_uri: str, dst: Path, policy: RetryPolicy) -> Path:
    import mlflow

    return Path(
        with_retries(
            "download the model",
            mlflow.artifacts.download_artifacts,
            artifact_uri=model_uri,
            dst_path=str(dst),
            policy=policy,
        )
    )


# --- our own scorer, from the installed code ------------------------------------------------------


@dataclass
class VerifiedModel:
    """A registered model's data files behind this installation's `ImageClassifier`."""

    classifier: Any  # components.scoring.serving_model.ImageClassifier, the installed one
    verified: str  # what was checked against the registry

    @property
    def classes(self) -> list[str]:
        return self.classifier.classes

    @property
    def engine(self) -> str:
        return self.classifier.engine

    @property
    def batch_size(self) -> int:
        return self.classifier.batch_size

    def score(self, images: list[bytes], limits: ImageLimits | None = None) -> np.ndarray:
        """Class probabilities for raw image bytes, decoded within `limits` (default: the stored serving ones)."""
        return self.classifier.score(images, limits)

    def predict(self, model_input: Any) -> pd.DataFrame:
        """What the served model answers for the same request (label, probability, probabilities)."""
        return self.classifier.predict(None, model_input)


def load_scoring_model(model_uri: str, policy: RetryPolicy = RetryPolicy.default()) -> VerifiedModel:
    """A registered (or logged) model for our own scoring: verified, then built from the installed code."""
    with tempfile.TemporaryDirectory(prefix="tp-model-") as tmp:
        local, _, verified = download_verified(model_uri, Path(tmp), policy)
        classifier = installed_classifier(local)
    print(f"{model_uri}: scored with the installed code; verified against the registry: {verified}")
    return VerifiedModel(classifier, verified)


def installed_classifier(local: Path) -> Any:
    """`ImageClassifier` of the installed code over a checked model folder's data files (no stored code runs)."""
    from components.scoring.serving_model import ImageClassifier

    pyfunc = check_logged_model(local)
    artifacts = {name: str(_inside(local, entry, name)) for name, entry in (pyfunc.get("artifacts") or {}).items()}
    for needed in ("keras_model", "classes"):
        if needed not in artifacts:
            raise UnsafeModel(f"the model has no {needed!r} artifact")
    classifier = ImageClassifier().load(artifacts, dict(pyfunc.get("config") or {}))
    cross_check(classifier)
    return classifier


def cross_check(classifier: Any) -> None:
    """classes.json and model_config against the Keras model itself: the checks that hold without a tree digest."""
    inputs, outputs = (getattr(classifier.model, key, None) for key in ("input_shape", "output_shape"))
    if isinstance(outputs, tuple) and outputs and outputs[-1] != len(classifier.classes):
        raise UnsafeModel(f"classes.json names {len(classifier.classes)} classes but the model outputs {outputs[-1]}")
    fixed = inputs[1:3] if isinstance(inputs, tuple) and len(inputs) == 4 else (None, None)
    if None not in fixed and tuple(fixed) != (classifier.image_size, classifier.image_size):
        raise UnsafeModel(f"model_config's image_size {classifier.image_size} is not the model's input {fixed}")


def _inside(local: Path, entry: Any, name: str) -> Path:
    """An artifact's file, which must be a regular file inside the model folder (MLmodel could name any path)."""
    relative = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(relative, str):
        raise UnsafeModel(f"artifact {name!r}: no path in MLmodel")
    candidate = local / relative
    path = candidate.resolve()
    if local.resolve() not in path.parents or candidate.is_symlink() or not path.is_file():
        raise UnsafeModel(f"artifact {name!r}: not a file inside the model folder")
    return path
