"""Process-level set-up shared by every stage: telemetry off, quiet logs, seeds, devices.

Imported first by each stage's CLI so that nothing phones home on an offline machine.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

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


def configure_tensorflow(seed: int) -> dict[str, Any]:
    """Seed everything and describe the devices; mixed precision only where a GPU is present."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised
            tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return {"gpus": len(gpus), "mixed_precision": bool(gpus), "jit_compile": bool(gpus)}


def jit_compile_default() -> bool:
    """XLA helps on GPUs and is ~7x slower on small CPUs, so only use it with a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def progress_verbosity() -> int:
    """Keras progress bars on a terminal; one line per epoch in logs (dvc, Prefect)."""
    return 1 if sys.stdout.isatty() else 2
