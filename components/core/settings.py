"""Settings that belong to the machine, not the project: read from the environment in one place.

`params.yaml` holds what a run does; these say where it runs and whom it tells. Servers and
credentials live here (or in MLflow's/DVC's own configuration), never in `params.yaml`.

    MLFLOW_TRACKING_URI     tracking server (wins over tracking.uri)
    TP_GPU_DEPLOYMENT       Prefect deployment that runs GPU stages (e.g. stage/gpu); unset = here
    TP_EMBED_DEPLOYMENT     Prefect deployment that runs shards of validate's embedding pass (e.g.
                            embed-shard/gpu; orchestration.embedding_shards); unset = here
    TP_PREFECT_FLOW_RUN_ID  set by the flow for its stage processes: lineage tag on registered models
    TP_MLFLOW_PARENT_RUN_ID set by the flow: the pipeline run's MLflow parent run, stage runs nest under it
    TP_NOTIFY_WEBHOOK_URL   webhook told about failures and promotions
    TP_NOTIFY_BLOCK         or: a Prefect notification block's slug (e.g. slack-webhook/ml-alerts)
    TP_EPOCH_SNAPSHOTS      a folder: train_head and finetune save weights after every epoch there (benchmarks
                            score them on test afterwards; components/modeling/snapshots.py); unset = none
    DVC_ROOT, DVC_EXP_NAME  set by DVC for stage commands: the main workspace (also inside `dvc exp run
                            --temp/--queue` folders) and the experiment's name when one runs
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EnvironmentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TP_", extra="ignore", frozen=True)

    tracking_uri: str | None = Field(None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI"))
    gpu_deployment: str | None = None
    embed_deployment: str | None = None
    prefect_flow_run_id: str | None = None
    mlflow_parent_run_id: str | None = None
    notify_webhook_url: str | None = None
    notify_block: str | None = None
    epoch_snapshots: Path | None = None
    dvc_root: Path | None = Field(None, validation_alias=AliasChoices("DVC_ROOT"))
    dvc_exp_name: str | None = Field(None, validation_alias=AliasChoices("DVC_EXP_NAME"))


def environment() -> EnvironmentSettings:
    """The current environment's settings (read anew each call: tests and the flow change variables)."""
    return EnvironmentSettings()


def workspace_root() -> Path:
    """The main workspace: DVC's root for stage commands (the parent repo inside experiment folders), else cwd.

    Workspace-wide state (the SQLite tracking store, feature cache, fine-tune checkpoints) is anchored
    here, so `dvc exp run --temp/--queue` experiments share one MLflow store and one cache with the
    main workspace instead of each opening a fresh one inside DVC's temporary folder.
    """
    root = environment().dvc_root
    return root.resolve() if root else Path.cwd()
