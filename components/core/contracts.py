"""What one stage hands another: a typed, versioned model of every hand-off file.

Writers and readers both go through these models, so a renamed or missing field fails loudly
at the reader (naming the file, the field and the stage to rerun) instead of turning into an
"n/a" three stages later. Every file named here is listed in the reading stage's `deps` in
`dvc.yaml`; `tests/unit/test_dag.py` keeps the two in step.

    file                               written by   read by
    data/manifest.csv                  ingest       validate (augment, train_head, finetune, evaluate read
    data/validated.csv                 validate       the validated copy: same columns)
    reports/ingest.json                ingest       validate, flows.summary
    reports/validation/summary.json    validate     evaluate (model card), flows.summary
    models/{head,finetune}/            train_head,  finetune, evaluate, export, batch prediction
      model.keras, classes.json, run.json  finetune
    reports/evaluate/promotion.json    evaluate     flows.training (export, notify), flows.summary
    metrics.json                       evaluate     dvc metrics, flows.summary
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SPLITS = ("train", "val", "test")
# data/manifest.csv and data/validated.csv: one row per file, in this order.
MANIFEST_COLUMNS = ["path", "label", "split", "sha256", "bytes", "width", "height", "format", "mode", "source", "error"]
# Columns every reader of a manifest relies on (a hand-made CSV for batch scoring may have only these).
MANIFEST_REQUIRED = ["path", "label", "split"]

MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
RUN_INFO_FILE = "run.json"

C = TypeVar("C", bound="Contract")


class ContractError(ValueError):
    """A hand-off file is missing, unreadable, from another schema version, or lacks a field."""


class Contract(BaseModel):
    """Base of every hand-off file: strict keys, a schema version, and the stage that writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SCHEMA: ClassVar[int] = 1
    WRITER: ClassVar[str] = ""  # the stage to rerun when the file is missing or stale

    schema_version: int = Field(1, description="Bumped when a field changes meaning; readers refuse other versions.")

    @classmethod
    def read(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        rerun = f"rerun the `{cls.WRITER}` stage" if cls.WRITER else "recreate it"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ContractError(f"{path} not found: {rerun}") from None
        except (OSError, ValueError) as exc:
            raise ContractError(f"{path}: not readable as JSON ({exc}): {rerun}") from None
        if not isinstance(raw, dict):
            raise ContractError(f"{path}: expected a JSON object, got {type(raw).__name__}: {rerun}")
        found = raw.get("schema_version")
        if found != cls.SCHEMA:
            raise ContractError(f"{path}: schema version {found!r}, this code reads {cls.SCHEMA}: {rerun}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()[:8])
            raise ContractError(f"{path}: {problems} ({cls.__name__}): {rerun}") from None

    @classmethod
    def read_optional(cls: type[C], path: str | Path) -> C | None:
        """None when the file does not exist (a run that stopped before its writer); errors otherwise."""
        return cls.read(path) if Path(path).exists() else None

    def write(self, path: str | Path) -> Path:
        from components.core.files import write_json

        write_json(path, self.model_dump(mode="json"))
        return Path(path)


# --- ingest -----------------------------------------------------------------------------------


class IngestReport(Contract):
    """reports/ingest.json: what was collected, where from (redacted), counts and the data version."""

    WRITER: ClassVar[str] = "ingest"

    source: str = Field(description="The source as given, with any credentials redacted.")
    source_kind: str
    layout: str
    raw_dir: str
    manifest: str
    data_version: str
    files: int
    images: int
    unreadable: int
    bytes: int
    counts: dict[str, dict[str, int]] = Field(description="images per split, then per class")
    class_folders: dict[str, int]
    ignored: list[str]
    ignored_count: int
    refused: list[dict[str, str]] = Field(
        default_factory=list, description="entries the source offered and ingest refused: {name, reason}"
    )
    refused_count: int = 0
    notes: list[str]
    seed: int
    split_fractions: dict[str, float]
    moved_to_val: dict[str, int] = Field(
        default_factory=dict, description="per class, training images moved to val (ingest.min_val_per_class)"
    )
    max_pixels: int
    seconds: float
    workers: int
    cache: dict[str, int]


# --- manifests ----------------------------------------------------------------------------------


def read_manifest(path: str | Path, required: list[str] | None = None) -> pd.DataFrame:
    """A manifest CSV with labels, splits and hashes kept as text; missing columns fail loudly."""
    from components.core.files import read_csv

    path = Path(path)
    try:
        frame = read_csv(path, dtype={"label": str, "split": str, "sha256": str, "path": str}, keep_default_na=False)
    except FileNotFoundError:
        raise ContractError(f"manifest {path} not found: run ingest (and validate) first") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ContractError(f"{path}: not a readable manifest CSV ({exc})") from None
    missing = [c for c in (required or MANIFEST_REQUIRED) if c not in frame.columns]
    if missing:
        raise ContractError(f"{path}: manifest lacks column(s) {missing}")
    return frame


def write_manifest(rows: pd.DataFrame | list[dict[str, Any]] | Iterator[tuple[Any, ...]], path: str | Path) -> Path:
    """Write a manifest with exactly MANIFEST_COLUMNS, atomically; an iterator of tuples in that order is streamed."""
    from components.core.files import write_csv, write_csv_rows

    if isinstance(rows, Iterator):
        return write_csv_rows(MANIFEST_COLUMNS, rows, path)  # a row at a time, no frame of them all (issue 24)
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ContractError(f"manifest for {path} lacks column(s) {missing}")
    return write_csv(frame[MANIFEST_COLUMNS], path)  # formula-like labels are neutralised


# --- validate -----------------------------------------------------------------------------------


class ValidationCounts(Contract):
    files: int
    valid: int
    quarantined: int
    hidden_files: int
    bad_files: int
    bad_fraction: float
    per_class: dict[str, int]
    per_split: dict[str, dict[str, int]]


class ValidationSummary(Contract):
    """reports/validation/summary.json: the verdict, counts, failures and the validated data version."""

    WRITER: ClassVar[str] = "validate"

    passed: bool
    policy: str
    manifest: str
    data_version: str
    validated_version: str
    counts: ValidationCounts
    problems: list[str]
    warnings: list[str]
    failures: list[dict[str, Any]]
    settings: dict[str, Any]
    ingest: dict[str, Any]
    data_docs: str
    near_duplicates: dict[str, Any] = Field(
        default_factory=dict,
        description="components.quality.near_duplicates report: policy, counts, groups, moved, "
        "problems, picture (relative to the summary); empty in summaries written before it existed",
    )


# --- model folders (train_head, finetune) ---------------------------------------------------------


class ModelRunInfo(Contract):
    """run.json in a model folder: how the model was trained, and the settings it was trained with."""

    WRITER: ClassVar[str] = "train_head or finetune"

    stage: str
    run_id: str
    experiment_id: str
    backbone: str
    alpha: float | None
    image_size: int
    weights: str
    data_version: str
    best_epoch: int
    epochs_run: int
    val_accuracy: float
    val_loss: float
    seconds: float
    device: dict[str, Any]
    model_sha256: str = Field(description="sha256 of model.keras, checked before it is loaded")
    settings: dict[str, Any] = Field(description="the params sections this model was trained with")
    prefect_flow_run_id: str | None = Field(None, description="the flow run that ran the stage, if a flow did")
    # train_head only
    cached_features: bool | None = None
    feature_cache: str | None = None
    feature_engine: str | None = Field(None, description="onnxruntime or keras; None: features from the cache")
    num_classes: int | None = None
    suspect_label_splits: list[str] | None = Field(
        None, description="splits the suspect-label check ranked (None: it did not run; label_issues.csv is empty)"
    )
    head_solver: dict[str, Any] | None = Field(
        None, description="the Adam and the linear head's val scores and which was kept (None: Adam alone)"
    )
    # finetune only
    head_run_id: str | None = None
    trainable_backbone_layers: int | None = None
    peak_learning_rate: float | None = Field(None, description="finetune.learning_rate as applied to this data")
    first_trainable_layer: str | None = None
    low_res_phase: dict[str, Any] | None = Field(
        None, description="the first epochs at low resolution: epochs, image_size, seconds, last train loss/accuracy"
    )
    temperature: float = Field(1.0, description="folded into the output layer's weights (1.0: not calibrated)")
    flip_tta: bool = Field(False, description="the model averages each image's probabilities with its mirror's")
    val_accuracy_single_view: float | None = Field(None, description="val accuracy of the classifier alone")
    val_accuracy_flip_tta: float | None = Field(None, description="val accuracy of the mean with the mirror image")
    crop_tta: bool = Field(False, description="the model averages 4 views: the image, its central crop, their mirrors")
    val_accuracy_crop_tta: float | None = Field(None, description="val accuracy of the mean over those 4 views")
    kept: Literal["head", "finetuned"] | None = Field(
        None, description="whose weights the model holds: the head's when fine-tuning did not beat them on val"
    )
    val_accuracy_head: float | None = Field(None, description="the head's val accuracy, one view, before calibration")
    val_log_loss_head: float | None = Field(None, description="the head's val log-loss, one view, before calibration")
    val_accuracy_finetuned: float | None = Field(None, description="the same for the fine-tuned weights")
    val_log_loss_finetuned: float | None = Field(None, description="the same for the fine-tuned weights")
    val_images: int | None = Field(None, description="the val images these choices were made on")
    val_intervals: dict[str, list[float]] | None = Field(
        None, description="95% intervals [low, high] of those val accuracies (Wilson) and gains (paired; *_minus_*)"
    )


# --- evaluate -------------------------------------------------------------------------------------


class ScoresRecord(Contract):
    accuracy: float
    min_class_recall: float
    n_test: int
    per_class_recall: dict[str, float] = Field(default_factory=dict)
    non_finite_rows: int = Field(0, description="test images whose probabilities held NaN or inf")


class PromotionRecord(Contract):
    """reports/evaluate/promotion.json: the version registered and the gate's decision with its reasons."""

    WRITER: ClassVar[str] = "evaluate"

    registered_model: str
    version: str
    run_id: str
    lineage: dict[str, str]
    promoted: bool
    reasons: list[str]
    challenger: ScoresRecord
    champion_version: str | None = None
    champion: ScoresRecord | None = None
    champion_problem: str | None = None
    thresholds: dict[str, float | bool] = Field(default_factory=dict)


class TestMetrics(BaseModel):
    """metrics.json: flat test metrics for `dvc metrics show` (DVC reads it too, so no schema field)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __test__ = False  # not a pytest class

    accuracy: float
    macro_f1: float
    ece: float
    n_test: float
    min_class_recall: float

    @classmethod
    def read_optional(cls, path: str | Path) -> TestMetrics | None:
        path = Path(path)
        if not path.exists():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, ValidationError) as exc:
            raise ContractError(f"{path}: not the evaluate stage's metrics ({exc}): rerun `evaluate`") from None

    def write(self, path: str | Path) -> Path:
        from components.core.files import write_json

        write_json(path, self.model_dump(mode="json"))
        return Path(path)
