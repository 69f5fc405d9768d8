"""Data parallelism over every accelerator a worker has: one context to build, compile and fit a model in.

`replica_plan(setting)` looks at the Keras backend and the visible accelerators (`runtime.device_names`, the one
device probe) and returns a `ReplicaPlan`; `with plan.scope():` around building, compiling and fitting a model
makes every step run on all of them:

- JAX with several GPUs/TPUs: `keras.distribution.DataParallel` over them (variables replicated, each batch
  split along its first axis). JAX shards a batch only evenly, so `plan.even_batches` asks the input to keep
  every batch a multiple of the replica count (`data.ImageBatches` tops up the last training batch), and
  `plan.validation_callbacks` scores val outside the distribution, where any batch size works.
- TensorFlow with several GPUs: `tf.distribute.MirroredStrategy()` (Keras 3 creates variables under its
  scope; a model built there keeps using it; it splits uneven batches itself).
- Otherwise (one device, `off`, another backend): no distribution, a no-op scope.

Batch sizes in params.yaml are GLOBAL: `batch_size` images per step in all, split across the replicas (so a
run's schedule and results do not depend on how many accelerators it got). `global_batch` rounds one that
does not divide to a multiple of the replica count, and says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from components.core import runtime

DataParallelSetting = Literal["auto", "off"]
ACCELERATORS: tuple[str, ...] = ("GPU", "TPU")


class ReplicaPlan:
    """How a model is replicated: `kind` ("keras DataParallel", "MirroredStrategy", "one device") over `devices`."""

    def __init__(self, backend: str, devices: tuple[str, ...] = (), reason: str = "one device") -> None:
        self.backend, self.devices, self.reason = backend, devices, reason
        self._distribution: Any = None  # built on first use: the Keras/TF object holding the replicas

    @property
    def replicas(self) -> int:
        return max(1, len(self.devices))

    @property
    def kind(self) -> str:
        if self.replicas == 1:
            return "one device"
        return "keras DataParallel" if self.backend == "jax" else "MirroredStrategy"

    @property
    def even_batches(self) -> bool:
        """Every batch fed under `scope()` must be a multiple of `replicas` (JAX shards only evenly)."""
        return self.kind == "keras DataParallel"

    def facts(self) -> dict[str, Any]:
        """What a run records: the replica count, how, and on which devices."""
        return {"replicas": self.replicas, "data_parallel": self.kind, "replica_devices": list(self.devices)}

    def distribution(self) -> Any:
        """The backend's object (a keras.distribution.DataParallel or a MirroredStrategy); None for one device."""
        if self._distribution is None and self.replicas > 1:
            if self.backend == "jax":
                import keras

                self._distribution = keras.distribution.DataParallel(devices=list(self.devices))
            else:
                import tensorflow as tf

                self._distribution = tf.distribute.MirroredStrategy(devices=[f"/{d}" for d in self.devices])
        return self._distribution

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """Build, compile and fit inside: under JAX it sets the Keras distribution (restored on exit)."""
        distribution = self.distribution()
        return contextlib.nullcontext() if distribution is None else distribution.scope()

    def replicate(self, model: Any) -> Any:
        """A copy of `model` built on every replica, with its weights (for a pass that only reads it);
        the model itself on one device."""
        if self.replicas == 1:
            return model
        import keras

        with self.scope():
            copy = keras.models.clone_model(model)
            copy.set_weights(model.get_weights())
        return copy

    def global_batch(self, batch_size: int, setting_name: str = "batch_size") -> int:
        """`batch_size` (global) rounded to a multiple of the replicas, at least one image per replica."""
        if batch_size % self.replicas == 0:
            return batch_size
        rounded = max(self.replicas, batch_size - batch_size % self.replicas)
        print(
            f"data parallel: {setting_name} {batch_size} is the global batch and does not split evenly over "
            f"{self.replicas} replicas: using {rounded} ({rounded // self.replicas} per replica)"
        )
        return rounded

    def validation_callbacks(self, val_batches: Any) -> tuple[Any, list[Any]]:
        """(validation_data for fit, callbacks to put FIRST): under JAX data parallelism val is scored by a
        callback outside the distribution (its last batch need not split evenly), writing the same val_* logs."""
        if not self.even_batches:
            return val_batches, []
        return None, [_validation_outside(self, val_batches)]


@contextlib.contextmanager
def _no_distribution() -> Iterator[None]:
    import keras

    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def _validation_outside(plan: ReplicaPlan, val_batches: Any) -> Any:
    import keras

    class ValidationOutsideDistribution(keras.callbacks.Callback):
        """fit()'s own validation, run on one device: every later callback sees val_loss, val_accuracy, ..."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            with _no_distribution():
                scores = self.model.evaluate(val_batches, verbose=0, return_dict=True)
            if logs is not None:
                logs.update({f"val_{name}": float(value) for name, value in scores.items()})

    return ValidationOutsideDistribution()


def replica_plan(setting: DataParallelSetting, kinds: tuple[str, ...] = ACCELERATORS) -> ReplicaPlan:
    """The plan for this process: data parallel over the devices of the first of `kinds` the backend has
    several of (GPUs, else TPUs), unless `setting` is "off". `kinds=("CPU",)` is for tests (XLA host devices)."""
    import keras

    backend = keras.config.backend()
    if setting == "off":
        return ReplicaPlan(backend, reason="data_parallel: off")
    if backend not in ("jax", "tensorflow"):
        return ReplicaPlan(backend, reason=f"no data parallelism wired for the {backend} backend")
    for kind in kinds:
        names = runtime.device_names((kind,))
        if len(names) > 1 and (backend == "jax" or kind == "GPU"):  # MirroredStrategy here: GPUs only
            return ReplicaPlan(backend, tuple(names), reason=f"{len(names)} {kind}s visible")
    return ReplicaPlan(backend, reason="fewer than two accelerators visible")


def announce(plan: ReplicaPlan, stage: str) -> None:
    """One log line: how many replicas this stage uses, and why."""
    devices = f" on {', '.join(plan.devices)}" if plan.devices else ""
    print(f"{stage}: {plan.replicas} replica(s), {plan.kind}{devices} ({plan.reason})")
