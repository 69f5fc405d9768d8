"""Typed settings: one pydantic model per `params.yaml` section.

`params.yaml` is the single source of truth for every knob. Unknown or mistyped keys and
out-of-range values are rejected with a message that names the key, the value and what is
allowed, before any stage does work.
"""

from __future__ import annotations

import difflib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS = Path("params.yaml")
# Query parameters that carry a secret (signed S3/GCS/Azure URLs, API tokens): never in settings.
SECRET_QUERY_KEYS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "sig",
        "token",
        "access_token",
        "id_token",
        "auth",
        "authorization",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "access_key",
        "accesskey",
        "awsaccesskeyid",
        "secret_key",
        "api_key",
        "apikey",
        "key",
    }
)
CREDENTIAL_HELP = (
    "put credentials in the environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
    "AWS_PROFILE for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://, fsspec storage options "
    "through FSSPEC_<PROTOCOL>_<OPTION> variables), or in a DVC remote's config "
    "(`dvc remote modify --local`)"
)


def credential_problem(location: str) -> str | None:
    """Why a URL must not be stored (a user:password@ or a token in its query), or None."""
    from urllib.parse import parse_qsl, urlsplit

    if "://" not in location:
        return None
    parts = urlsplit(location)
    if "@" in parts.netloc:
        return "holds a user name or password (user:password@)"
    secrets = sorted({k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in SECRET_QUERY_KEYS})
    return f"holds a credential in its query ({', '.join(secrets)})" if secrets else None


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a setting's value: itself, or inside its lists and mappings (keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)


def holds_credential(value: Any) -> bool:
    return any(credential_problem(text) for text in strings_in(value))


class ParamsError(ValueError):
    """A settings problem a user can fix by editing params.yaml (or an override)."""


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    return get_origin(annotation) in (Union, __import__("types").UnionType) and bool in get_args(annotation)


def _yaml_word(annotation: Any, value: bool) -> str | None:
    """YAML 1.1 reads unquoted on/off as true/false: the word back, where the field is a Literal of it."""
    word = "on" if value else "off"
    return word if get_origin(annotation) is Literal and word in get_args(annotation) else None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Where a credential goes instead of a URL in this section's settings (its message when one is refused).
    credential_help: ClassVar[str] = CREDENTIAL_HELP

    @field_validator("*")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        # One rule for every setting, whatever its type: no URL in it (alone, or in a list or mapping)
        # holds a user name, password or token. Settings reach DVC's lock file, MLflow params and logs.
        for text in strings_in(value):
            problem = credential_problem(text)
            if problem:
                raise ValueError(f"a URL in this setting {problem}; {cls.credential_help}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `true` as 1 for an int field: `epochs: true` must be an error, not one epoch.
        if (
            isinstance(value, bool)
            and info.field_name
            and not _accepts_bool(cls.model_fields[info.field_name].annotation)
        ):
            word = _yaml_word(cls.model_fields[info.field_name].annotation, value)
            if word is not None:
                return word
            raise ValueError("expected a number or text, got a boolean (true/false)")
        return value


class ProjectConfig(Section):
    seed: int = Field(42, description="Seed for splits, augmentation, weights init and shuffling.")


class ModelConfig(Section):
    backbone: str = Field("mobilenet_v2", description="Key in components.backbones.BACKBONES.")
    alpha: float | None = Field(0.5, gt=0, le=1.4, description="Width multiplier (MobileNet family only).")
    image_size: int = Field(224, ge=32, le=1024, description="Square input side in pixels.")
    weights: str = Field("imagenet", description="'imagenet', 'none', or a path to a weights file.")


class TrackingConfig(Section):
    credential_help: ClassVar[str] = (
        "set the server in MLFLOW_TRACKING_URI and its credentials in MLFLOW_TRACKING_USERNAME/"
        "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN (environment variables) instead"
    )

    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins when set "
        "(servers and credentials belong in the environment, not here).",
    )
    experiment: str = Field("transfer-pipeline", min_length=1)
    registered_model: str = Field("image-classifier", min_length=1)
    retry_attempts: int = Field(4, ge=1, le=20, description="Tries per MLflow call before a stage fails.")
    retry_backoff_s: float = Field(2.0, ge=0, le=60, description="First wait between tries; doubles each time.")
    system_metrics_interval_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="Stage runs sample CPU, memory, disk, network (and GPU) every this many seconds as MLflow "
        "system metrics; 0 = off. A stage shorter than one interval logs none.",
    )


class SplitFractions(Section):
    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class IngestConfig(Section):
    source: str = Field(
        "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
        min_length=1,
        description="Folder of class sub-folders (optionally under train/val/test), CSV/Parquet "
        "manifest, .zip/.tar.gz archive, or URL (http(s)://, s3://, gs://).",
    )
    classes: list[str] | None = Field(None, description="Expected label set; null accepts the labels found.")
    split: SplitFractions = SplitFractions()
    workers: int = Field(0, ge=0, description="Processes for hashing and decoding; 0 = one per core.")
    max_bytes: int = Field(20 * 1024**3, gt=0, description="Cap on the bytes any source delivers (archives: unpacked).")
    max_files: int = Field(1_000_000, gt=0, description="Cap on the files any source delivers (archives: members).")
    max_archive_metadata_bytes: int = Field(
        256 * 1024**2,
        gt=0,
        description="Cap on an archive's metadata: tar long-name and pax headers in total, a zip's central directory.",
    )
    allow_http: bool = Field(False, description="Accept plain http:// URLs (https, s3 and gs always).")
    allow_private_hosts: bool = Field(
        False, description="Accept URLs whose host is loopback, private or link-local (e.g. a lab server)."
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Folders or bucket prefixes that manifest rows may name besides the manifest's own folder.",
    )
    follow_links_within_root: bool = Field(
        True, description="Follow symlinks that stay inside the source root; links out of it are always refused."
    )
    allow_hard_links: bool = Field(
        False,
        description="Read source files that have more than one name (hard links); one may be a file "
        "outside the source, which a hard link cannot show.",
    )
    download_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Deadline for each whole HTTP(S) request (connect, redirects, headers, body)."
    )
    max_redirects: int = Field(5, ge=0, le=20, description="HTTP redirects followed for a URL source.")


class NearDuplicatesConfig(Section):
    policy: Literal["move", "report", "fail", "off"] = Field(
        "move",
        description="Near-duplicate groups across splits: move to the split of the smallest content hash, "
        "report only, fail validation, or off (no perceptual hashing). Groups under 2+ labels are quarantined.",
    )
    max_distance: int = Field(
        10, ge=0, le=32, description="Largest Hamming distance between 64-bit perceptual hashes of one group."
    )


class ValidateConfig(Section):
    policy: Literal["quarantine", "fail"] = "quarantine"
    allowed_formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "BMP", "WEBP"])
    min_width: int = Field(32, ge=1)
    min_height: int = Field(32, ge=1)
    max_width: int = Field(12_000, ge=1)
    max_height: int = Field(12_000, ge=1)
    max_pixels: int = Field(80_000_000, ge=1, le=1_000_000_000, description="Decompression-bomb guard.")
    max_image_bytes: int = Field(50 * 1024**2, ge=1024, le=2 * 1024**3, description="Largest image file accepted.")
    min_images_per_class: int = Field(10, ge=1)
    max_class_imbalance: float = Field(10.0, ge=1, description="Largest class size / smallest class size.")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="Quarantine more than this and the run fails.")
    near_duplicates: NearDuplicatesConfig = NearDuplicatesConfig()

    @model_validator(mode="after")
    def _consistent_bounds(self) -> ValidateConfig:
        for low, high in (("min_width", "max_width"), ("min_height", "max_height")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) is larger than {high} ({getattr(self, high)})")
        if self.min_width * self.min_height > self.max_pixels:
            raise ValueError(
                f"min_width x min_height ({self.min_width * self.min_height}) exceeds max_pixels "
                f"({self.max_pixels}): no image could pass"
            )
        return self


class AugmentConfig(Section):
    policy: list[dict[str, dict[str, Any]]] = Field(
        default_factory=lambda: [
            {"HorizontalFlip": {"p": 0.5}},
            {"Affine": {"scale": [0.9, 1.15], "rotate": [-15, 15], "p": 0.7}},
            {"RandomBrightnessContrast": {"brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5}},
        ],
        description="albumentations 2.x transforms in order, each {Name: {argument: value}}.",
    )
    preview_images: int = Field(16, ge=1, le=64)

    @field_validator("policy")
    @classmethod
    def _one_transform_per_item(cls, policy: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
        for i, item in enumerate(policy):
            if len(item) != 1:
                raise ValueError(f"item {i} must map exactly one transform name to its arguments, got {list(item)}")
        return policy


class LabelIssuesConfig(Section):
    action: Literal["report", "exclude", "off"] = Field(
        "report",
        description="Suspect labels of every split (cleanlab on probabilities from heads that did not see "
        "each image): report them, also exclude the top training ones from head training (listed in the "
        "model folder; val and test images are never excluded), or skip the check.",
    )
    folds: int = Field(5, ge=2, le=20, description="Folds of the out-of-fold heads.")
    max_excluded_fraction: float = Field(
        0.02,
        ge=0,
        le=0.5,
        description="With action exclude: at most this fraction of training images, most suspect first.",
    )
    gallery_images: int = Field(16, ge=1, le=64, description="Top suspects shown in label_issues.png.")


class TrainHeadConfig(Section):
    batch_size: int = Field(
        32, ge=1, le=4096, description="Also the feature-extraction batch (32 is ~2x faster than 64 on CPU)."
    )
    epochs: int = Field(40, ge=1)
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    pooling: Literal["avg", "max"] = Field("avg", description="Global pooling of the backbone's feature map.")
    hidden_units: int = Field(0, ge=0, description="Optional dense layer before the classifier; 0 = none.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighting: Literal["balanced", "none"] = "balanced"
    early_stopping_patience: int = Field(5, ge=1)
    cached_features: bool = Field(True, description="Train the head on backbone features computed once.")
    augmented_copies: int = Field(
        2, ge=0, le=32, description="Augmented variants per training image in the feature cache."
    )
    feature_engine: Literal["auto", "onnxruntime", "keras"] = Field(
        "auto",
        description="Frozen feature pass: auto = ONNX Runtime on a CPU where it is installed "
        "(checked against Keras on a probe batch), Keras otherwise.",
    )
    label_issues: LabelIssuesConfig = LabelIssuesConfig()


class FinetuneConfig(Section):
    unfreeze_layers: int | None = Field(
        100, ge=1, description="Train the top N backbone layers; all three unfreeze keys null = the backbone's default."
    )
    unfreeze_from: str | None = Field(None, description="Or: train from this backbone layer name upwards.")
    unfreeze_fraction: float | None = Field(
        None, gt=0, le=1, description="Or: train this top fraction of backbone layers (wins over unfreeze_layers)."
    )
    batch_size: int = Field(32, ge=1, le=4096)
    epochs: int = Field(12, ge=0, description="Upper bound; 0 = keep the head model as is.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak after warm-up; cosine decay to 0.")
    warmup_epochs: int = Field(1, ge=0)
    early_stopping_patience: int = Field(4, ge=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    calibrate: bool = Field(
        True,
        description="Fit a temperature on val after fine-tuning and fold it into the output layer "
        "(probabilities people can threshold; predictions unchanged).",
    )
    flip_tta: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Average each prediction with the mirror image's (2x inference cost). auto: keep it "
        "only when it raises val accuracy (never judged on test); on/off: always/never.",
    )
    keep_head_if_not_better: bool = Field(
        True,
        description="After training, score the head and the fine-tuned model on val (single view, before "
        "calibration: accuracy, then log-loss); keep the head's weights unless the fine-tuned ones beat them. "
        "false: always keep the fine-tuned weights.",
    )


class PromotionConfig(Section):
    min_accuracy: float = Field(0.5, ge=0, le=1, description="Test accuracy a version needs to become champion.")
    min_class_recall: float = Field(0.0, ge=0, le=1, description="Every class's test recall must reach this.")
    min_improvement: float = Field(
        0.0, ge=0, le=1, description="Accuracy margin over the champion re-scored on the same test split."
    )
    promote_on_tie: bool = Field(False, description="Whether equal accuracy (within float noise) promotes.")
    max_class_recall_drop: float = Field(
        0.03, ge=0, le=1, description="No class's recall may fall more than this below the champion's."
    )
    allow_class_set_change: bool = Field(
        False, description="Promote when the class set differs from the champion's (it cannot be re-scored)."
    )


class ServingConfig(Section):
    max_images_per_request: int = Field(64, ge=1, le=10_000, description="Images one served request may hold.")
    max_request_bytes: int = Field(
        64 * 1024**2, ge=1024, le=2 * 1024**3, description="Total image bytes one served request may hold."
    )
    max_pixels: int = Field(
        25_000_000,
        ge=1,
        le=1_000_000_000,
        description="Pixels one served image may have (from its header, before decoding); serving's own cap, "
        "smaller than validate.max_pixels, which training, evaluation and batch scoring use.",
    )
    max_request_pixels: int = Field(
        200_000_000,
        ge=1,
        le=10_000_000_000,
        description="Pixels all the images of one served request may have together (the request's decode budget).",
    )

    @model_validator(mode="after")
    def _budget_fits_an_image(self) -> ServingConfig:
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) is below max_pixels ({self.max_pixels}): "
                "a request could not hold one image of the largest size allowed"
            )
        return self


class ExperimentsConfig(Section):
    register_model: bool = Field(False, description="Whether a DVC experiment registers its model (as a challenger).")
    promote: bool = Field(
        False, description="With register_model: the gate may make it champion (main-line runs always may)."
    )


class EvaluateConfig(Section):
    batch_size: int = Field(64, ge=1)
    top_k: int = Field(3, ge=1, description="Top-k accuracy is reported when there are more than 5 classes.")
    worst_examples: int = Field(16, ge=0, le=64, description="Misclassified test images shown in the gallery.")
    calibration_bins: int = Field(10, ge=2, le=100, description="Confidence bins for ECE and the reliability diagram.")
    inference_engine: Literal["auto", "onnxruntime", "keras"] = Field(
        "auto",
        description="Scoring the test split: auto = ONNX Runtime on a CPU where it is installed (checked "
        "against Keras on a probe batch; the accepted file is also served), Keras otherwise; keras never exports.",
    )
    promotion: PromotionConfig = PromotionConfig()
    experiments: ExperimentsConfig = ExperimentsConfig()
    serving: ServingConfig = ServingConfig()


class DriftConfig(Section):
    policy: Literal["always", "on_drift", "alert"] = Field(
        "always",
        description="Retrain on any new data (always), only on drift or new classes (on_drift), or "
        "never because of drift (alert: report only).",
    )
    significance: float = Field(
        0.01, gt=0, lt=1, description="Family-wise false-alarm rate of the MMD tests (Bonferroni)."
    )
    permutations: int = Field(200, ge=20, le=10_000, description="Relabellings for each permutation p-value.")
    reference_per_class: int = Field(
        100, ge=5, le=5_000, description="Training embeddings per class kept with a model."
    )
    sample_per_class: int = Field(100, ge=5, le=5_000, description="New images per class embedded and tested.")
    max_confidence_drop: float = Field(
        0.1, ge=0, le=1, description="A larger drop of the champion's mean top-class probability counts as drift."
    )


# The stage is called `validate`, which shadows pydantic's deprecated BaseModel.validate classmethod;
# instance attribute access still returns the section, so the warning is noise.
warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)


class StageTimeouts(Section):
    """Seconds each stage's `dvc repro` may take before its processes are killed."""

    ingest: float = Field(7200, gt=0, le=7 * 86400)
    validate: float = Field(3600, gt=0, le=7 * 86400)
    augment: float = Field(1800, gt=0, le=7 * 86400)
    train_head: float = Field(7200, gt=0, le=7 * 86400)
    finetune: float = Field(14400, gt=0, le=7 * 86400)
    evaluate: float = Field(3600, gt=0, le=7 * 86400)


class StageRetries(Section):
    """Further tries of each stage after an outage or a killed process (never after a crash or bad input)."""

    ingest: int = Field(2, ge=0, le=10)
    validate: int = Field(0, ge=0, le=10)
    augment: int = Field(1, ge=0, le=10)
    train_head: int = Field(1, ge=0, le=10)
    finetune: int = Field(1, ge=0, le=10)
    evaluate: int = Field(2, ge=0, le=10)


class OrchestrationConfig(Section):
    """How the Prefect flows (flows/) bound a run: timeouts, retries, one run per workspace.

    Trusted like every limit: no run form may change it (RUN_FORM_FORBIDDEN).
    """

    flow_timeout_s: float = Field(
        43200,
        gt=0,
        le=7 * 86400,
        description="A training or stage flow run, from the moment it holds the workspace; past it the run "
        "ends TimedOut and frees the workspace and the deployment's queue.",
    )
    stage_timeout_s: StageTimeouts = StageTimeouts()
    step_timeout_s: float = Field(
        1800,
        gt=0,
        le=86400,
        description="Every other task of the flows: preflight, drift check, export, DVC push, MLflow calls.",
    )
    remote_stage_timeout_s: float = Field(
        21600,
        gt=0,
        le=7 * 86400,
        description="Waiting for a stage sent to the GPU deployment (its queue time included); the remote run "
        "is cancelled past it.",
    )
    workspace_wait_s: float = Field(
        43200,
        ge=0,
        le=7 * 86400,
        description="How long a run waits for another run of the same workspace to finish before it fails.",
    )
    concurrency_limit: str = Field(
        "tp-workspace",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="Prefect global concurrency limit (limit 1, made if missing) every run of this workspace "
        "takes; give workspaces that share a Prefect server different names.",
    )
    stage_retries: StageRetries = StageRetries()
    predict_timeout_s: float = Field(
        7200, gt=0, le=7 * 86400, description="Scoring one batch-prediction request (flows/predict.py)."
    )
    predict_retries: int = Field(
        2, ge=0, le=10, description="Further tries of a batch prediction after an outage (never after bad input)."
    )
    retry_delays_s: list[float] = Field(
        default_factory=lambda: [10.0, 60.0],
        min_length=1,
        max_length=10,
        description="Wait before each retry of a stage (the last repeats).",
    )
    retry_jitter_factor: float = Field(
        0.5, ge=0, le=2, description="Random spread of each retry delay (Prefect's retry_jitter_factor)."
    )

    @field_validator("retry_delays_s")
    @classmethod
    def _delays_are_sane(cls, delays: list[float]) -> list[float]:
        if any(not 0 <= d <= 3600 for d in delays):
            raise ValueError("each delay must be between 0 and 3600 seconds")
        return delays


# --- what a deployment's run form may ask for ---------------------------------------------------------

# Settings no run form may change, whatever `deployments.override_keys` says: sources and their limits,
# tracking (URIs, the registry), image and request caps, the promotion gate, what experiments may
# register, files read as weights or by transforms, and these rules themselves.
RUN_FORM_FORBIDDEN = (
    "ingest",
    "tracking",
    "validate",
    "evaluate.promotion",
    "evaluate.experiments",
    "evaluate.serving",
    "model.weights",
    "augment.policy",
    "deployments",
    "orchestration",
)
RUN_FORM_OVERRIDE_KEYS = [
    "project.seed",
    "model.backbone",
    "model.alpha",
    "model.image_size",
    "train_head.batch_size",
    "train_head.epochs",
    "train_head.learning_rate",
    "train_head.dropout",
    "train_head.pooling",
    "train_head.hidden_units",
    "train_head.label_smoothing",
    "train_head.class_weighting",
    "train_head.early_stopping_patience",
    "train_head.augmented_copies",
    "finetune.unfreeze_layers",
    "finetune.unfreeze_from",
    "finetune.unfreeze_fraction",
    "finetune.batch_size",
    "finetune.epochs",
    "finetune.learning_rate",
    "finetune.warmup_epochs",
    "finetune.early_stopping_patience",
    "finetune.label_smoothing",
    "finetune.calibrate",
    "finetune.flip_tta",
    "evaluate.batch_size",
    "evaluate.top_k",
    "evaluate.worst_examples",
    "evaluate.calibration_bins",
]


def covers(prefix: str, key: str) -> bool:
    """Whether the setting `prefix` (a section or a key) is `key` or holds it."""
    return key == prefix or key.startswith(prefix + ".")


def setting_exists(key: str) -> bool:
    """Whether `section[.key...]` names a section or key of params.yaml."""
    model: type[BaseModel] = Params
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif i < len(parts) - 1:
            return False
    return True


class DeploymentsConfig(Section):
    """What a deployment's run form (Prefect parameters: untrusted) may ask for.

    Read only from the worker's own params.yaml, never from a run form; CLI runs are trusted and not
    limited by it (components/run_forms.py).
    """

    input_roots: list[str] = Field(
        default_factory=list,
        description="Folders (or bucket/URL prefixes) a run form's inputs and training source may lie under; "
        "[] = none (local paths resolved, links followed).",
    )
    output_dir: str = Field(
        "predictions", min_length=1, description="The one folder batch prediction writes into (relative: workspace)."
    )
    model_names: list[str] | None = Field(
        None, description="Registered models a run form may score with; null = tracking.registered_model."
    )
    git_refs: list[str] = Field(
        default_factory=lambda: ["origin/*"],
        description="A GPU stage run's git_rev must be a commit on one of these remote branches (fnmatch patterns).",
    )
    override_keys: list[str] = Field(
        default_factory=lambda: list(RUN_FORM_OVERRIDE_KEYS),
        description="Settings (section.key, or a whole section) a run form may override; never a limit.",
    )

    @field_validator("override_keys")
    @classmethod
    def _never_a_limit(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not setting_exists(key):
                raise ValueError(f"{key!r} is not a setting of params.yaml")
            widened = [f for f in RUN_FORM_FORBIDDEN if covers(key, f) or covers(f, key)]
            if widened:
                raise ValueError(f"{key!r} would let a run form change {', '.join(widened)}: never from a run form")
        return keys


class Params(Section):
    project: ProjectConfig = ProjectConfig()
    model: ModelConfig = ModelConfig()
    tracking: TrackingConfig = TrackingConfig()
    ingest: IngestConfig = IngestConfig()
    validate: ValidateConfig = ValidateConfig()  # type: ignore[assignment]
    augment: AugmentConfig = AugmentConfig()
    train_head: TrainHeadConfig = TrainHeadConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    drift: DriftConfig = DriftConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    deployments: DeploymentsConfig = DeploymentsConfig()


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` (minus its last element), for 'did you mean' hints."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(err: dict[str, Any], source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _known_keys(Params, loc)
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f"; did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?" if hint else ""
        allowed = f" (allowed here: {', '.join(known)})" if known else ""
        return f"{source}: unknown key '{key}'{suggestion}{allowed}"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    if holds_credential(value):
        shown = "(a value holding a credential, not shown)"
    return f"{source}: '{key}' = {shown}: {err['msg']}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise ParamsError listing every problem by key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ParamsError("invalid settings:\n  - " + "\n  - ".join(lines)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'finetune.epochs=3' -> (['finetune', 'epochs'], 3), the value read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r} must look like section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ParamsError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return merged


def read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ParamsError(f"{path}: settings file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read, merge overrides into, and validate a params file."""
    path = Path(path)
    raw = read_yaml(path)
    if overrides:
        if raw is not None and not isinstance(raw, dict):
            raise ParamsError(f"{path}: the top level must be a mapping of sections")
        raw = apply_overrides(raw or {}, overrides)
    return parse_params(raw, source=str(path))


def write_overrides(path: str | Path, overrides: list[str]) -> Params:
    """Validate overrides, then set them in the params file keeping its comments (like `dvc exp run -S`)."""
    from ruamel.yaml import YAML

    path = Path(path)
    params = load_params(path, overrides)  # validates everything first: nothing is written on error
    rt = YAML()
    rt.preserve_quotes = True
    with open(path, encoding="utf-8") as fh:
        doc = rt.load(fh)
    for text in overrides:
        keys, value = parse_override(text)
        node = doc
        for part in keys[:-1]:
            if part not in node:
                node[part] = {}
            node = node[part]
        node[keys[-1]] = value
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        rt.dump(doc, fh)
    tmp.replace(path)
    return params


# --- typed overrides (the Prefect run form, the flow's --set) ---------------------------------------


def _optional_fields(model: type[BaseModel]) -> type[BaseModel]:
    """The same sections and keys as `model`, every one optional (None = keep params.yaml's value)."""
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _optional_fields(annotation)
        fields[name] = (annotation | None, Field(None, description=field.description))
    return create_model(f"{model.__name__}Overrides", __config__=ConfigDict(extra="forbid"), **fields)


ParamsOverrides = _optional_fields(Params)
ParamsOverrides.__doc__ = (
    "Settings to change for one run, by section and key; unset keys keep params.yaml's value. "
    "The whole result is validated against params.yaml's rules before any stage runs."
)


def overrides_to_strings(overrides: BaseModel | dict[str, Any] | None) -> list[str]:
    """Typed overrides as `section.key=value` strings (the form `--set` and `dvc exp run -S` take)."""
    if overrides is None:
        return []
    data = overrides.model_dump(exclude_none=True) if isinstance(overrides, BaseModel) else overrides

    def flatten(prefix: str, node: Any) -> list[str]:
        if isinstance(node, dict) and not (prefix.endswith("augment.policy")):
            return [
                item for key, value in node.items() for item in flatten(f"{prefix}.{key}" if prefix else key, value)
            ]
        return [f"{prefix}={json.dumps(node)}"]

    return flatten("", data)


def overrides_from_strings(texts: list[str]) -> BaseModel:
    """`--set section.key=value` strings as typed overrides (each key checked, values read as YAML)."""
    nested: dict[str, Any] = {}
    for text in texts:
        path, value = parse_override(text)
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    try:
        return ParamsOverrides.model_validate(nested)
    except ValidationError as exc:
        lines = [_describe(e, "--set") for e in exc.errors()]
        raise ParamsError("invalid settings:\n  - " + "\n  - ".join(lines)) from None
