"""Process-level set-up shared by every stage: telemetry off, quiet logs, seeds, devices (any Keras backend).

Imported first by each stage's CLI so that nothing phones home on an offline machine.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import Any, NoReturn

# Outbound calls the libraries make unless told not to (a silent network could hang a run).
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "DVC_NO_ANALYTICS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def quiet_environment() -> None:
    """Switch off telemetry and update checks; explicit settings in the environment win."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


quiet_environment()


def configure_devices(seed: int) -> dict[str, Any]:
    """Seed everything and describe the devices; mixed precision only where a GPU is present.

    On the TensorFlow backend GPUs also get memory growth. On another backend (JAX on GPU workers,
    which have no TensorFlow) TensorFlow is never imported: GPUs are counted through the backend.
    """
    import keras

    keras.utils.set_random_seed(seed)
    if keras.config.backend() != "tensorflow":
        gpus = gpu_count()
        if gpus:
            keras.mixed_precision.set_global_policy("mixed_float16")
        return {"gpus": gpus, "mixed_precision": bool(gpus), "jit_compile": jit_compile_default()}
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised
            tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return {"gpus": len(gpus), "mixed_precision": bool(gpus), "jit_compile": bool(gpus)}


configure_tensorflow = configure_devices  # the name the stages have always called


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask (what a container or `taskset` allows), not the host's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity call (macOS, Windows): every core counts
        return max(1, os.cpu_count() or 1)


def device_names(kinds: tuple[str, ...] = ("GPU",)) -> list[str]:
    """Devices of these kinds ("GPU", "TPU", "CPU") the Keras backend sees, as "<kind>:<index>" (lower case):
    the one device probe ([] where the backend has none, or its GPU support is not installed)."""
    import keras

    backend = keras.config.backend()
    names: list[str] = []
    if backend == "tensorflow":
        import tensorflow as tf

        for kind in kinds:
            names += [f"{kind.lower()}:{i}" for i, _ in enumerate(tf.config.list_physical_devices(kind))]
    elif backend == "jax":
        import jax

        for kind in kinds:
            try:
                names += [f"{device.platform}:{device.id}" for device in jax.devices(kind.lower())]
            except (RuntimeError, ValueError):  # no such platform (CPU-only jaxlib, JAX_PLATFORMS=cpu)
                pass
    elif backend == "torch" and "GPU" in kinds:
        import torch

        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names


def visible_devices(kinds: tuple[str, ...] = ("GPU",)) -> int:
    """How many devices of these kinds the Keras backend sees (`device_names`)."""
    return len(device_names(kinds))


def gpu_count() -> int:
    """GPUs the Keras backend sees (data-parallel replicas, mixed precision)."""
    return visible_devices(("GPU",))


def accelerator_present() -> bool:
    """A GPU or TPU is visible to the Keras backend (there Keras beats ONNX Runtime's CPU provider)."""
    return visible_devices(("GPU", "TPU")) > 0


def jit_compile_default() -> bool:
    """`jit_compile` for model.compile: on TensorFlow, XLA only with a GPU (it is ~7x slower on small
    CPUs); JAX always compiles with XLA (False would run it op by op); other backends: off."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return backend == "jax"


def progress_verbosity() -> int:
    """Keras progress bars on a terminal; one line per epoch in logs (dvc, Prefect)."""
    return 1 if sys.stdout.isatty() else 2


def use_system_arrow_memory() -> None:
    """Arrow buffers (pandas' text columns) from the C library's allocator instead of pyarrow's default
    mimalloc, which keeps freed pages: validate's peak on 20,000 generated images was 381 MB against 362 MB
    (issue 24). For a stage process, before its first table is read."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


# Loaded by the stages that train or score; tearing their modules down at exit costs about 1.3 s a process.
HEAVY_FRAMEWORKS = ("tensorflow", "jax", "torch")


def exit_process(code: int) -> NoReturn:
    """End a stage's process with `code` (its `__main__` block). Once a deep-learning framework is loaded,
    skip the interpreter's module teardown, which writes nothing. The rest of CPython's exit path still
    runs, in its order: thread pools are shut down and non-daemon threads waited for, atexit handlers run
    (logging, MLflow), and the standard streams are flushed."""
    wait_for_threads = getattr(threading, "_shutdown", None)  # private, but what the interpreter calls at exit
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    heavy = any(name in sys.modules for name in HEAVY_FRAMEWORKS)
    if not heavy or wait_for_threads is None or run_exit_handlers is None:
        sys.exit(code)
    wait_for_threads()
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed or detached: nothing left to flush
            stream.flush()
    os._exit(code)
