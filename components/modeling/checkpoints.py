"""Fine-tuning that survives a kill: one checkpoint folder per set of inputs and settings.

`.checkpoints/finetune/<key of inputs and params>/` (outside the DVC outputs, under the main workspace so
experiments resume too) holds Keras' per-epoch backup (weights, optimizer, epoch), the epoch log across
resumes and the MLflow run id, so a killed run resumes from its last finished epoch in the same MLflow run.
The stage deletes the folder after success.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components.core import hashing
from components.core.config import Params
from components.core.contracts import MODEL_FILE
from components.core.paths import FinetunePaths
from components.modeling import learning_curves

CHECKPOINT_ROOT = Path(".checkpoints/finetune")  # under workspace_root(): experiments resume too
RUN_ID_FILE = "mlflow_run_id.txt"
EPOCH_LOG = "epochs.csv"
BACKUP = "state"  # Keras' BackupAndRestore folder: present from the first finished epoch until fit() ends


def checkpoint_key(params: Params, manifest: str | Path, policy_path: str | Path | None, head_dir: str | Path) -> str:
    return hashing.content_key(
        {
            "head": hashing.file_sha256(Path(head_dir) / MODEL_FILE),
            "data": hashing.file_sha256(manifest),
            "policy": hashing.file_sha256(policy_path) if policy_path else None,
            "finetune": params.finetune.model_dump(),
            "seed": params.project.seed,
        }
    )


@dataclass(frozen=True)
class Checkpoint:
    """The resume state of one fine-tuning: its folder, named by the key of its inputs and settings."""

    folder: Path

    @classmethod
    def of(cls, root: str | Path, params: Params, paths: FinetunePaths) -> Checkpoint:
        return cls(Path(root) / checkpoint_key(params, paths.manifest, paths.policy, paths.head_dir))

    def previous_run_id(self) -> str | None:
        """The MLflow run an interrupted fine-tuning with these inputs left (None: a fresh start)."""
        path = self.folder / RUN_ID_FILE
        return path.read_text().strip() if path.is_file() else None

    def start(self, run_id: str) -> None:
        """Create the folder (only once the run has started: a run refused at the start leaves nothing)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / RUN_ID_FILE).write_text(run_id)  # a resumed run continues this MLflow run

    def callbacks(self) -> list[Any]:
        """Back up every finished epoch (restored on a resume) and append it to the epoch log."""
        import keras

        return [
            keras.callbacks.BackupAndRestore(str(self.folder / BACKUP), double_checkpoint=True),
            keras.callbacks.CSVLogger(str(self.folder / EPOCH_LOG), append=True),
        ]

    def has_backup(self) -> bool:
        """Whether an interrupted run left a finished epoch's backup (fit() resumes from it)."""
        return (self.folder / BACKUP).is_dir()

    def history(self) -> pd.DataFrame:
        """Epochs logged so far, across resumes (a repeated epoch keeps its last row), 1-based."""
        log = pd.read_csv(self.folder / EPOCH_LOG).drop_duplicates("epoch", keep="last").sort_values("epoch")
        return learning_curves.history_frame(
            {c: log[c].tolist() for c in log.columns if c != "epoch"}, first_epoch=int(log["epoch"].iloc[0]) + 1
        )

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
