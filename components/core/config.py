"""Typed settings: `Params`, the model of `params.yaml`, and how it is read and validated.

`params.yaml` is the single source of truth for every knob. Unknown or mistyped keys and
out-of-range values are rejected with a message that names the key, the value and what is
allowed, before any stage does work. Here: the project-wide sections (project, model, tracking),
what a deployment's run form may change (deployments), and loading. The stage sections live in
components/core/stage_config.py, orchestration in components/core/orchestration_config.py, the rules every
section shares in components/core/section.py; changing settings for one run in components/core/overrides.py.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from components.core.credentials import holds_credential
from components.core.evaluate_config import DriftConfig, EvaluateConfig
from components.core.orchestration_config import OrchestrationConfig
from components.core.section import Section
from components.core.stage_config import (
    AugmentConfig,
    FinetuneConfig,
    IngestConfig,
    TrainHeadConfig,
    ValidateConfig,
)

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A settings problem a user can fix by editing params.yaml (or an override)."""


class ProjectConfig(Section):
    seed: int = Field(42, description="Seed for splits, augmentation, weights init and shuffling.")


class ModelConfig(Section):
    backbone: str = Field("mobilenet_v2", description="Key in components.modeling.backbones.BACKBONES.")
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
    "train_head.solver",
    "finetune.unfreeze_layers",
    "finetune.unfreeze_from",
    "finetune.unfreeze_fraction",
    "finetune.batch_size",
    "finetune.epochs",
    "finetune.learning_rate",
    "finetune.warmup_epochs",
    "finetune.early_stopping_patience",
    "finetune.label_smoothing",
    "finetune.bottom_lr_factor",
    "finetune.ema_epochs",
    "finetune.mixup_alpha",
    "finetune.low_res_epochs",
    "finetune.low_res_size",
    "finetune.calibrate",
    "finetune.flip_tta",
    "finetune.crop_tta",
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
    limited by it (components/lifecycle/run_forms.py).
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


def invalid_settings(exc: ValidationError, source: str) -> ParamsError:
    """Every problem of a failed validation, one line each, named by key (`source`: where the settings came from)."""
    lines = [_describe(e, source) for e in exc.errors()]
    return ParamsError("invalid settings:\n  - " + "\n  - ".join(lines))


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise ParamsError listing every problem by key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise invalid_settings(exc, source) from None


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
    """A copy of `raw` with `section.key=value` overrides set (core/overrides.py: the rest of their handling)."""
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
