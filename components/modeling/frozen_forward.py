"""Forward passes through frozen weights, on ONNX Runtime where it is faster, Keras otherwise.

Every pass that only reads a model (train_head's feature cache, evaluation, batch prediction) can call
`frozen_predict(model, batches)` or keep a `FrozenRunner`. On a CPU with onnxruntime installed and the
TensorFlow backend, the model is exported to ONNX once, cached and checked against Keras on a probe
batch (`components.modeling.onnx_inference`), and run with ONNX Runtime (2.75x the images/s of TensorFlow on
the 2-core machine, see benchmarks/results/frozen_pass.md). Anywhere else (a GPU, another Keras
backend, onnxruntime missing, an export that fails or disagrees with Keras) the same call runs
Keras `predict`, and `runner.reason` says why. Given a `ReplicaPlan` with several replicas
(components.modeling.distribution), the Keras pass runs data parallel on a copy of the model built on all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from components.core import runtime
from components.modeling import onnx_inference
from components.modeling.distribution import ReplicaPlan
from components.modeling.onnx_inference import DEFAULT_TOLERANCE, OnnxExport

Engine = Literal["auto", "onnxruntime", "keras"]
ENGINES: tuple[str, ...] = ("auto", "onnxruntime", "keras")
DEFAULT_BATCH_SIZE = 32


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
        parallel: ReplicaPlan | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine = {engine!r}: expected one of {', '.join(ENGINES)}")
        self.model = model
        self.threads = threads or runtime.available_cores()
        self.session: Any = None
        self.export: OnnxExport | None = None
        self.engine, self.reason = "keras", "engine: keras requested"
        self.plan: ReplicaPlan | None = None
        if engine == "keras":
            self._replicate(parallel)
            return
        blocker = self._onnx_blocker(cache_dir)
        if blocker is None:
            self.export = onnx_inference.export_onnx(
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
            self._replicate(parallel)
            return
        self.session = onnx_inference.cpu_session(self.export.path, self.threads, allow_spinning)  # type: ignore[union-attr]
        self.engine, self.reason = "onnxruntime", f"ONNX Runtime, {self.threads} threads, {self.export.path.name}"  # type: ignore[union-attr]

    def _replicate(self, plan: ReplicaPlan | None) -> None:
        """Keras runs: on every replica of `plan` where it has several."""
        if plan is None or plan.replicas == 1:
            return
        self.model, self.plan = plan.replicate(self.model), plan
        self.reason += f"; data parallel over {plan.replicas} replicas ({plan.kind})"

    @property
    def replicas(self) -> int:
        """Devices the forward pass runs on at once."""
        return self.plan.replicas if self.plan is not None else 1

    @property
    def accepted_export(self) -> OnnxExport | None:
        """The checked ONNX file this runner runs (None where Keras runs): the one a served model may run too."""
        return self.export if self.engine == "onnxruntime" and self.export is not None else None

    @staticmethod
    def _onnx_blocker(cache_dir: str | Path | None) -> str | None:
        import keras

        if cache_dir is None:
            return "no ONNX cache folder given"
        if keras.config.backend() != "tensorflow":
            return f"the Keras backend is {keras.config.backend()} (the ONNX export path here is tf2onnx)"
        if not onnx_inference.onnxruntime_available():
            return "onnxruntime/tf2onnx/onnx are not installed (pip install 'transfer-pipeline[onnx]')"
        if runtime.accelerator_present():
            return "an accelerator is present (Keras runs there)"
        return None

    def predict(self, batches: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, verbose: int = 0) -> np.ndarray:
        """Outputs for every input in order, float32, shape (n, ...) like `model.predict`."""
        if self.session is None:
            return self._keras_predict(batches, batch_size, verbose)
        blocks = list(self.predict_batches(batches, batch_size=batch_size, verbose=verbose))
        return np.concatenate(blocks) if blocks else np.zeros((0, *self._output_tail()), np.float32)

    def predict_batches(
        self, batches: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, verbose: int = 0
    ) -> Iterator[np.ndarray]:
        """The outputs of one batch at a time, in order, float32: memory holds one batch, not the whole pass."""
        from tqdm import tqdm

        batch_iter = tqdm(
            _as_batches(batches, batch_size),
            desc=self.engine,
            unit="batch",
            disable=not verbose,
            total=_batch_count(batches, batch_size),
            mininterval=2.0,
        )
        for batch in batch_iter:
            if len(batch):
                yield self._run_batch(batch)

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        if self.session is not None:
            return onnx_inference.run_session(self.session, batch)
        if self.plan is None:
            return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)
        # On every replica; JAX needs a multiple of them: the last image repeated, the padding's outputs dropped.
        pad = -len(batch) % self.plan.replicas if self.plan.even_batches else 0
        padded = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)]) if pad else batch
        with self.plan.scope():
            outputs = self.model.predict(padded, batch_size=len(padded), verbose=0)
        return np.asarray(outputs, dtype=np.float32)[: len(batch)]

    def _keras_predict(self, batches: Any, batch_size: int, verbose: int) -> np.ndarray:
        if self.plan is None:
            return self._keras_batches(batches, batch_size, verbose)
        blocks = list(self.predict_batches(batches, batch_size=batch_size, verbose=verbose))
        return np.concatenate(blocks) if blocks else np.zeros((0, *self._output_tail()), np.float32)

    def _keras_batches(self, batches: Any, batch_size: int, verbose: int) -> np.ndarray:
        if isinstance(batches, np.ndarray) or hasattr(batches, "element_spec"):  # arrays and tf.data: Keras batches
            return np.asarray(
                self.model.predict(
                    batches, batch_size=None if hasattr(batches, "element_spec") else batch_size, verbose=verbose
                ),
                dtype=np.float32,
            )
        blocks = list(self.predict_batches(batches, batch_size=batch_size))
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
