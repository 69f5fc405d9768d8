"""A Keras model as an ONNX file: exported once, checked against Keras, cached; ONNX Runtime sessions over it.

`components.modeling.frozen_forward` decides where a frozen forward pass runs and uses this module for the
ONNX side: whether ONNX Runtime can run here (`onnxruntime_available`; accelerators: `runtime.accelerator_present`), the
model exported with `keras.Model.export(format="onnx")` (i.e. tf2onnx), cached on disk under a
content key and checked against Keras on a probe batch (`export_onnx`), and CPU sessions over the
accepted file. The served model (`components.scoring.serving_model`) only runs a file whose sha256 it was
given (`verified_bytes`, `cpu_session`): loading it never imports the exporter.

The cache key is `model_fingerprint(model)` (layer types and configs, input/output shapes and the
weights' bytes) unless the caller passes its own, so a changed weight can never reuse a stale
file. The cache folder comes from params (trusted); nothing an image set contains picks a path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.core import files, runtime
from components.core.hashing import file_sha256

DEFAULT_TOLERANCE = 1e-4  # max |onnx - keras| on the probe batch, relative to max(1, max |keras|)
PROBE_IMAGES = 2
PROBE_SIZE = 128  # probe side for a model that takes any image size (the classifier)
# The workspace's one ONNX cache, relative to components.core.settings.workspace_root(): train_head's
# `<feature cache>/../onnx` (data/cache/features -> data/cache/onnx) and evaluate's scoring file share it.
CACHE_DIR = Path("data/cache/onnx")


# --- what is available here ------------------------------------------------------------------


def onnxruntime_available() -> bool:
    """onnxruntime can run the file; tf2onnx and onnx (needed to export it) import."""
    try:
        import onnx  # noqa: F401  (imported to see that it loads)
        import onnxruntime  # noqa: F401  (imported to see that it loads)
        import tf2onnx  # noqa: F401  (imported to see that it loads)
    except ImportError:
        return False
    return True


def runtime_available() -> bool:
    """onnxruntime imports: enough to run an accepted file (the served model never exports, so no tf2onnx)."""
    try:
        import onnxruntime  # noqa: F401  (imported to see that it loads)
    except ImportError:
        return False
    return True


# --- the cache key ---------------------------------------------------------------------------


def _all_layers(model: Any) -> Iterator[Any]:
    import keras

    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def model_fingerprint(model: Any) -> str:
    """A stable hash of what the forward pass computes: layer types and configs, shapes, weights.

    Layer names are left out (Keras numbers auto-named inputs per process), so the same model
    built or loaded in two processes gets the same key.
    """
    import keras

    digest = hashlib.sha256()
    shapes = {"inputs": [list(t.shape) for t in model.inputs], "outputs": [list(t.shape) for t in model.outputs]}
    digest.update(json.dumps(shapes, default=str).encode())
    for layer in _all_layers(model):
        config = {} if isinstance(layer, keras.Model) else dict(layer.get_config())
        for volatile in ("name", "trainable"):
            config.pop(volatile, None)
        digest.update(json.dumps([type(layer).__name__, config], sort_keys=True, default=str).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:24]


def _toolchain() -> dict[str, str]:
    import keras
    import onnx
    import onnxruntime
    import tf2onnx

    return {
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


# --- export once, check, cache ---------------------------------------------------------------


@dataclass(frozen=True)
class OnnxExport:
    """One cached export: the file, and how far it was from Keras on the probe batch."""

    path: Path
    key: str
    max_abs_diff: float
    accepted: bool
    sha256: str = ""  # of the file as checked against Keras (what a logged copy must still hash to)


def _input_shape(model: Any, input_size: int | None) -> tuple[int, int, int]:
    _, height, width, channels = model.inputs[0].shape
    if input_size is not None:
        height = width = input_size
    return int(height or PROBE_SIZE), int(width or PROBE_SIZE), int(channels or 3)


def _probe_batch(shape: tuple[int, int, int]) -> np.ndarray:
    """Fixed random images in 0..255, the range every model of this project takes."""
    return np.random.default_rng(0).uniform(0.0, 255.0, (PROBE_IMAGES, *shape)).astype(np.float32)


def _session(path: Path | bytes, threads: int, allow_spinning: bool = True) -> Any:
    """A CPU session over a file, or over a model's bytes already in memory (the ones that were hashed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Spinning workers answer fastest on an idle machine; on cores shared with other work they burn
    # the time the straggler thread needs (see benchmarks/results/frozen_pass.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def _run_session(session: Any, batch: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: batch})[0])


class OnnxFileChanged(ValueError):
    """An ONNX file whose sha256 is not the one recorded for it: never handed to ONNX Runtime."""


def verified_bytes(path: str | Path, expected_sha256: str) -> bytes:
    """The bytes of an ONNX file from elsewhere (a downloaded model), refused if their sha256 differs.

    Hand these bytes, not the path, to `cpu_session`: what was hashed is what runs.
    """
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise OnnxFileChanged(
            f"refused to load {Path(path).name}: its sha256 differs from the one recorded when the model was logged"
        )
    return data


def cpu_session(model: Path | bytes, threads: int = 0, allow_spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session; spinning off by default, since a served model shares its cores with its
    HTTP server (and a frozen pass with tf.data decoding)."""
    return _session(model, threads or runtime.available_cores(), allow_spinning)


def run_session(session: Any, batch: np.ndarray) -> np.ndarray:
    """The first output of a session for one float32 batch (the classifier's probabilities)."""
    return _run_session(session, np.ascontiguousarray(batch, dtype=np.float32))


def _export_to(model: Any, path: Path, input_size: int | None) -> None:
    input_signature = None
    if input_size is not None:
        import keras

        channels = int(model.inputs[0].shape[-1] or 3)
        input_signature = [keras.InputSpec(shape=(None, input_size, input_size, channels), dtype="float32")]
    elif not getattr(model, "_called", False):
        with warnings.catch_warnings():  # "structure of inputs doesn't match": a bare tensor for ['image'] is fine
            warnings.simplefilter("ignore", UserWarning)
            model(_probe_batch(_input_shape(model, None))[:1], training=False)  # Keras exports called models only
    model.export(str(path), format="onnx", verbose=False, input_signature=input_signature)


def export_onnx(
    model: Any,
    cache_dir: str | Path,
    *,
    key: str | None = None,
    input_size: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int | None = None,
) -> OnnxExport:
    """The model as an ONNX file in `cache_dir`: reused when present and intact, else exported and checked.

    `input_size` fixes the spatial input size (ONNX Runtime plans a static shape better); leave it
    None to keep the model's own signature. The check runs Keras and ONNX Runtime on the same probe
    batch; an export further than `tolerance` is recorded as not accepted (and not used).
    """
    from filelock import FileLock

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = key or model_cache_key(model, input_size)
    onnx_path, record_path = cache_dir / f"{key}.onnx", cache_dir / f"{key}.json"
    with FileLock(str(cache_dir / f"{key}.lock")):  # two workers exporting the same model export it once
        cached = _read_record(onnx_path, record_path)
        if cached is not None:
            return cached
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
        try:
            tmp_path = tmp_dir / "model.onnx"
            _export_to(model, tmp_path, input_size)
            probe = _probe_batch(_input_shape(model, input_size))
            expected = np.asarray(model.predict(probe, verbose=0), dtype=np.float32)
            got = _run_session(_session(tmp_path, threads or runtime.available_cores()), probe)
            diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
            accepted = diff <= tolerance * max(1.0, float(np.max(np.abs(expected))))
            tmp_path.replace(onnx_path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        sha256 = file_sha256(onnx_path)
        files.write_json(
            record_path,
            {
                "key": key,
                "sha256": sha256,
                "max_abs_diff": diff,
                "tolerance": tolerance,
                "accepted": accepted,
                "input_size": input_size,
                "probe_shape": list(probe.shape),
                **_toolchain(),
            },
        )
        return OnnxExport(onnx_path, key, diff, accepted, sha256)


def model_cache_key(model: Any, input_size: int | None = None) -> str:
    """The default cache key: the model's fingerprint, the fixed input size and the toolchain versions."""
    parts = {"model": model_fingerprint(model), "input_size": input_size, **_toolchain()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _read_record(onnx_path: Path, record_path: Path) -> OnnxExport | None:
    """The cached export, or None when it is missing, unreadable or not the file it describes."""
    if not (onnx_path.is_file() and record_path.is_file()):
        return None
    try:
        record = files.read_json(record_path)
        sha256 = file_sha256(onnx_path)
        if record.get("sha256") != sha256:
            return None  # a torn or replaced file: export again
        return OnnxExport(
            onnx_path, str(record["key"]), float(record["max_abs_diff"]), bool(record["accepted"]), sha256
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
