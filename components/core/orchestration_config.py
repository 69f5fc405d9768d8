"""params.yaml's `orchestration:` section: how the Prefect flows (flows/) bound a run."""

from __future__ import annotations

from pydantic import Field, field_validator

from components.core.section import Section


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
    embedding_shards: int = Field(
        1,
        ge=1,
        le=256,
        description="With validate.near_duplicates.embeddings: the flow splits validate's embedding pass into this "
        "many Prefect tasks by content hash before validate (components/embed.py), on the TP_EMBED_DEPLOYMENT work "
        "pool, else one after another here; validate then finds them cached. 1: validate embeds alone.",
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
