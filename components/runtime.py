"""Process-level set-up shared by every stage: telemetry off, quiet logs, seeds, atomic outputs.

Imported first by each stage's CLI so that nothing phones home on an offline machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
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


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `target` only if the block succeeds.

    A killed process leaves the old output (or none), never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `target` that is renamed over it when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
