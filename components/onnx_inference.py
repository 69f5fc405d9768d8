"""Forward passes through frozen weights, on ONNX Runtime where it is faster, Keras otherwise.

Every pass that only reads a model (train_head's feature cache, evaluation, champion re-scoring,
batch prediction) can call `frozen_predict(model, batches)` or keep a `FrozenRunner`. On a CPU
with onnxruntime installed and the TensorFlow backend, the model is exported to ONNX once
(`keras.Model.export(format="onnx")`, i.e. tf2onnx), cached on disk under a content key, checked
against Keras on a probe batch, and run with ONNX Runtime (2.75x the images/s of TensorFlow on
the 2-core machine, see benchmarks/results/frozen_pass.md). Anywhere else (a GPU, another Keras
backend, onnxruntime missing, an export that fails or disagrees with Keras) the same call runs
Keras `predict`, and `runner.reason` says why.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from components import files, runtime
from components.hashing import file_sha256

Engine = Literal["auto", "onnxruntime", "keras"]
ENGINES: tuple[str, ...] = ("auto", "onnxruntime", "keras")
DEFAULT_TOLERANCE = 1e-4  # max |onnx - keras| on the probe batch, relative to max(1, max |keras|)
DEFAULT_BATCH_SIZE = 32
PROBE_IMAGES = 2
PROBE_SIZE = 128  # probe side for a model that takes any image size (the classifier)
# The workspace's one ONNX cache, relative to components.settings.workspace_root(): train_head's
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


def accelerator_present() -> bool:
    """A GPU/TPU is visible to the Keras backend (there Keras beats ONNX Runtime's CPU provider)."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


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


def cpu_session(model: Path | bytes, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session; spinning off, since a served model shares its cores with its HTTP server."""
    return _session(model, threads or runtime.available_cores(), allow_spinning=False)


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


# --- running it ------------------------------------------------------------------------------


def _as_batches(batches: Any, batch_size: int) -> Iterator[np.ndarray]:
    """float32 numpy batches from an array, a tf.data dataset or any iterable; labels dropped."""
    if isinstance(batches, np.ndarray):
        for start in range(0, len(batches), batch_size):
            yield np.ascontiguousarray(batches[start : start + batch_size], dtype=np.float32)
        return
    for element in batches:
        x = element[0] if isinstance(element, (tuple, list)) else element
        yield np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def _batch_count(batches: Any, batch_size: int) -> int | None:
    """How many batches a progress bar should expect, where that is known without iterating."""
    if isinstance(batches, np.ndarray):
        return -(-len(batches) // batch_size)
    cardinality = getattr(batches, "cardinality", None)
    count = int(cardinality()) if callable(cardinality) else -1
    return count if count >= 0 else None


class FrozenRunner:
    """Runs one frozen model's forward pass on the faster engine available; `engine`/`reason` say which.

    engine="auto" picks ONNX Runtime on a CPU with onnxruntime installed and the TensorFlow
    backend, Keras otherwise; "onnxruntime" insists (raises if it cannot); "keras" never exports.
    Spinning is off by default: on 2 shared cores (and beside tf.data decoding in the same process)
    it made ONNX Runtime 1.5x slower in the median round (benchmarks/results/frozen_pass.md).
    """

    def __init__(
        self,
        model: Any,
        *,
        cache_dir: str | Path | None = None,
        engine: Engine = "auto",
        threads: int = 0,
        key: str | None = None,
        input_size: int | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        allow_spinning: bool = False,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine = {engine!r}: expected one of {', '.join(ENGINES)}")
        self.model = model
        self.threads = threads or runtime.available_cores()
        self.session: Any = None
        self.export: OnnxExport | None = None
        self.engine, self.reason = "keras", "engine: keras requested"
        if engine == "keras":
            return
        blocker = self._onnx_blocker(cache_dir)
        if blocker is None:
            self.export = export_onnx(
                model,
                cache_dir,
                key=key,
                input_size=input_size,  # type: ignore[arg-type]
                tolerance=tolerance,
                threads=self.threads,
            )
            if not self.export.accepted:
                blocker = (
                    f"the ONNX export differs from Keras by {self.export.max_abs_diff:.2e} "
                    f"(> tolerance {tolerance:.0e}) on the probe batch"
                )
        if blocker is not None:
            if engine == "onnxruntime":
                raise RuntimeError(f"engine: onnxruntime was requested but {blocker}")
            self.reason = blocker
            return
        self.session = _session(self.export.path, self.threads, allow_spinning)  # type: ignore[union-attr]
        self.engine, self.reason = "onnxruntime", f"ONNX Runtime, {self.threads} threads, {self.export.path.name}"  # type: ignore[union-attr]

    @staticmethod
    def _onnx_blocker(cache_dir: str | Path | None) -> str | None:
        import keras

        if cache_dir is None:
            return "no ONNX cache folder given"
        if keras.config.backend() != "tensorflow":
            return f"the Keras backend is {keras.config.backend()} (the ONNX export path here is tf2onnx)"
        if not onnxruntime_available():
            return "onnxruntime/tf2onnx/onnx are not installed (pip install 'transfer-pipeline[onnx]')"
        if accelerator_present():
            return "an accelerator is present (Keras runs there)"
        return None

    def predict(self, batches: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, verbose: int = 0) -> np.ndarray:
        """Outputs for every input in order, float32, shape (n, ...) like `model.predict`."""
        if self.session is None:
            return self._keras_predict(batches, batch_size, verbose)
        from tqdm import tqdm

        batch_iter = tqdm(
            _as_batches(batches, batch_size),
            desc="onnxruntime",
            unit="batch",
            disable=not verbose,
            total=_batch_count(batches, batch_size),
            mininterval=2.0,
        )
        blocks = [_run_session(self.session, batch) for batch in batch_iter if len(batch)]
        return np.concatenate(blocks) if blocks else np.zeros((0, *self._output_tail()), np.float32)

    def _keras_predict(self, batches: Any, batch_size: int, verbose: int) -> np.ndarray:
        if isinstance(batches, np.ndarray) or hasattr(batches, "element_spec"):  # arrays and tf.data: Keras batches
            return np.asarray(
                self.model.predict(
                    batches, batch_size=None if hasattr(batches, "element_spec") else batch_size, verbose=verbose
                ),
                dtype=np.float32,
            )
        blocks = [
            np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)
            for batch in _as_batches(batches, batch_size)
            if len(batch)
        ]
        return np.concatenate(blocks) if blocks else np.zeros((0, *self._output_tail()), np.float32)

    def _output_tail(self) -> tuple[int, ...]:
        return tuple(int(d or 0) for d in self.model.outputs[0].shape[1:])


def frozen_predict(
    model: Any,
    batches: Iterable[Any] | np.ndarray,
    *,
    cache_dir: str | Path | None = None,
    engine: Engine = "auto",
    threads: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    verbose: int = 0,
) -> np.ndarray:
    """One frozen forward pass over `batches` (see FrozenRunner); keep a runner to reuse its session."""
    runner = FrozenRunner(model, cache_dir=cache_dir, engine=engine, threads=threads)
    return runner.predict(batches, batch_size=batch_size, verbose=verbose)
