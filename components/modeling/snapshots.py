"""Per-epoch weight snapshots, for benchmarks that measure test accuracy after every epoch.

When the machine setting `TP_EPOCH_SNAPSHOTS` names a folder, train_head and finetune save the
weights they train after every epoch into `<folder>/<stage>/epoch_NNN.weights.h5` and append one
line per epoch to `<folder>/epochs.jsonl` (stage, epoch, wall-clock time at the epoch's end, the
seconds the save itself took). `benchmarks/run.py` scores the snapshots on the test split after
the run, so no stage ever reads the test split and the stages' timing stays their own (minus the
recorded save time). Unset, nothing is saved and nothing changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from components.core.settings import environment

LOG_FILE = "epochs.jsonl"


def snapshot_callbacks(stage: str, weights_of: str = "model") -> list[Any]:
    """[a Keras callback saving the fitted model's weights each epoch] when TP_EPOCH_SNAPSHOTS is set, else [].

    `weights_of` says what the fitted model is ("head": the head sub-model on cached features,
    "model": the whole classifier), so a reader knows where to load the weights.
    """
    if environment().epoch_snapshots is None:
        return []
    import keras

    class EpochSnapshots(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            val_accuracy = float((logs or {}).get("val_accuracy", float("nan")))
            save_snapshot(stage, self.model, epoch + 1, weights_of, val_accuracy)

    return [EpochSnapshots()]


def save_snapshot(stage: str, model: Any, epoch: int, weights_of: str, val_accuracy: float) -> None:
    """Save `model`'s weights as the snapshot of `epoch` (a weights change outside fit, too: train_head's linear
    head is recorded as the epoch after the Adam head's last) when TP_EPOCH_SNAPSHOTS is set; else nothing."""
    folder = environment().epoch_snapshots
    if folder is None:
        return
    target = Path(folder) / stage
    target.mkdir(parents=True, exist_ok=True)
    ended = time.time()
    path = target / f"epoch_{epoch:03d}.weights.h5"
    model.save_weights(str(path))
    record = {
        "stage": stage,
        "epoch": epoch,
        "weights_of": weights_of,
        "path": str(path),
        "ended_unix": ended,
        "save_seconds": round(time.time() - ended, 3),
        "val_accuracy": val_accuracy,
    }
    with open(Path(folder) / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def read_log(folder: str | Path) -> list[dict[str, Any]]:
    """The snapshot records in the order the epochs ended."""
    path = Path(folder) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
