"""Where each stage reads and writes: the one table of hand-off paths, relative to the workspace.

A stage's CLI takes its defaults from its paths model here (`add_arguments`, `from_args`), the flows and the
run summary read the same names, and `dvc.yaml` spells the same paths in each stage's `cmd`:
`tests/unit/test_paths.py` checks that every path a stage reads is one of its `deps`, every path it writes
is one of its outputs, and the command passes each path with the default named here. What the files hold is
typed in `components/core/contracts.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field

RAW_DIR = Path("data/raw")
MANIFEST = Path("data/manifest.csv")
INGEST_REPORT = Path("reports/ingest.json")
VALIDATED_MANIFEST = Path("data/validated.csv")
VALIDATION_DIR = Path("reports/validation")
VALIDATION_SUMMARY = VALIDATION_DIR / "summary.json"
QUARANTINE_LIST = VALIDATION_DIR / "quarantine.csv"
AUGMENT_POLICY = Path("models/augment/policy.json")
AUGMENT_PREVIEW = Path("reports/augment/preview.png")
HEAD_DIR = Path("models/head")
TRAIN_HEAD_REPORTS = Path("reports/train_head")
SUSPECT_LABELS = TRAIN_HEAD_REPORTS / "label_issues.csv"
FINETUNE_DIR = Path("models/finetune")
FINETUNE_REPORTS = Path("reports/finetune")
EVALUATE_REPORTS = Path("reports/evaluate")
PROMOTION_RECORD = EVALUATE_REPORTS / "promotion.json"
METRICS = Path("metrics.json")
TEST_PREDICTIONS = Path("reports/test_predictions.csv")
# Not DVC outputs: a cache, and what the flow writes around the stages.
FEATURE_CACHE = Path("data/cache/features")
EMBEDDING_CACHE = Path("data/cache/embeddings")  # per model key, chunks of per-image embeddings
ONNX_CACHE = Path("data/cache/onnx")  # the exported backbone, shared with train_head's feature pass
EXPORT_DIR = Path("models/export")
EXPORT_RECORD = EXPORT_DIR / "export.json"
DRIFT_REPORT = Path("reports/drift.json")
RUN_SUMMARY_JSON = Path("reports/run_summary.json")
RUN_SUMMARY_MD = Path("reports/run_summary.md")
SWEEP_REPORTS = Path("reports/sweep")


class StagePaths(BaseModel):
    """A stage's input and output paths; each field is one `--flag` of the stage's CLI (underscores as dashes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    STAGE: ClassVar[str] = ""
    INPUTS: ClassVar[tuple[str, ...]] = ()  # fields the stage reads: each one of its dvc.yaml deps
    OUTPUTS: ClassVar[tuple[str, ...]] = ()  # fields it writes: each one of its dvc.yaml outs, metrics or plots
    UNTRACKED: ClassVar[tuple[str, ...]] = ()  # neither: caches DVC does not version

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for name, field in cls.model_fields.items():
            default = field.default
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                type=Path,
                default=default,
                help=f"{field.description} (default: {default})",
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(**{name: getattr(args, name) for name in cls.model_fields})

    def under(self, root: str | Path) -> Self:
        """The same paths resolved under a workspace root (absolute paths stay as they are)."""
        return type(self)(**{name: Path(root) / value for name, value in self})


class IngestPaths(StagePaths):
    STAGE: ClassVar[str] = "ingest"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("raw_dir", "manifest", "report")

    raw_dir: Path = Field(RAW_DIR, description="where the source's files are copied")
    manifest: Path = Field(MANIFEST, description="one row per file")
    report: Path = Field(INGEST_REPORT, description="counts, data version, refusals, timings")


class ValidatePaths(StagePaths):
    STAGE: ClassVar[str] = "validate"
    INPUTS: ClassVar[tuple[str, ...]] = ("manifest", "ingest_report")
    OUTPUTS: ClassVar[tuple[str, ...]] = ("out_manifest", "report_dir")

    manifest: Path = Field(MANIFEST, description="written by ingest")
    ingest_report: Path = Field(INGEST_REPORT, description="ingest's report: class folders and data version")
    out_manifest: Path = Field(VALIDATED_MANIFEST, description="rows that passed")
    report_dir: Path = Field(VALIDATION_DIR, description="summary.json, quarantine.csv, data_docs/")


class AugmentPaths(StagePaths):
    STAGE: ClassVar[str] = "augment"
    INPUTS: ClassVar[tuple[str, ...]] = ("manifest",)
    OUTPUTS: ClassVar[tuple[str, ...]] = ("policy_out", "preview")

    manifest: Path = Field(VALIDATED_MANIFEST, description="validated manifest")
    policy_out: Path = Field(AUGMENT_POLICY, description="the augmentation policy, saved for training and lineage")
    preview: Path = Field(AUGMENT_PREVIEW, description="a grid of augmented training images")


class TrainHeadPaths(StagePaths):
    STAGE: ClassVar[str] = "train_head"
    INPUTS: ClassVar[tuple[str, ...]] = ("manifest", "policy")
    OUTPUTS: ClassVar[tuple[str, ...]] = ("out_dir", "report_dir")
    UNTRACKED: ClassVar[tuple[str, ...]] = ("cache_dir",)

    manifest: Path = Field(VALIDATED_MANIFEST, description="validated manifest")
    policy: Path = Field(AUGMENT_POLICY, description="augmentation policy from the augment stage")
    out_dir: Path = Field(HEAD_DIR, description="model folder to write (model.keras, classes.json, run.json)")
    report_dir: Path = Field(TRAIN_HEAD_REPORTS, description="history.csv, curves.png, metrics.json, label_issues.csv")
    cache_dir: Path = Field(FEATURE_CACHE, description="frozen-feature cache (not a DVC output)")


class FinetunePaths(StagePaths):
    STAGE: ClassVar[str] = "finetune"
    INPUTS: ClassVar[tuple[str, ...]] = ("manifest", "policy", "head_dir")
    OUTPUTS: ClassVar[tuple[str, ...]] = ("out_dir", "report_dir")

    manifest: Path = Field(VALIDATED_MANIFEST, description="validated manifest")
    policy: Path = Field(AUGMENT_POLICY, description="augmentation policy from the augment stage")
    head_dir: Path = Field(HEAD_DIR, description="train_head's model folder, the starting point")
    out_dir: Path = Field(FINETUNE_DIR, description="model folder to write")
    report_dir: Path = Field(FINETUNE_REPORTS, description="history.csv, curves.png, metrics.json, calibration.json")


class EvaluatePaths(StagePaths):
    STAGE: ClassVar[str] = "evaluate"
    INPUTS: ClassVar[tuple[str, ...]] = (
        "manifest",
        "model_dir",
        "head_dir",
        "suspects",
        "ingest_report",
        "validation_summary",
    )
    OUTPUTS: ClassVar[tuple[str, ...]] = ("report_dir", "metrics", "predictions")

    manifest: Path = Field(VALIDATED_MANIFEST, description="validated manifest: its test split")
    model_dir: Path = Field(FINETUNE_DIR, description="the fine-tuned model folder")
    head_dir: Path = Field(HEAD_DIR, description="train_head's model folder, for the model card")
    suspects: Path = Field(SUSPECT_LABELS, description="suspect labels: test accuracy is also reported without them")
    ingest_report: Path = Field(INGEST_REPORT, description="ingest's report: data version for lineage and the card")
    validation_summary: Path = Field(VALIDATION_SUMMARY, description="validate's summary: quarantined count")
    report_dir: Path = Field(EVALUATE_REPORTS, description="reports, figures, model card, promotion.json")
    metrics: Path = Field(METRICS, description="flat test metrics for dvc metrics")
    predictions: Path = Field(TEST_PREDICTIONS, description="path,actual,predicted,probability per test image")


STAGE_PATHS: dict[str, type[StagePaths]] = {
    paths.STAGE: paths
    for paths in (IngestPaths, ValidatePaths, AugmentPaths, TrainHeadPaths, FinetunePaths, EvaluatePaths)
}
