"""Prefect flows: they orchestrate the stages in components/ and hold no ML or data logic of their own."""

import os

from components.core.runtime import quiet_environment

quiet_environment()  # before Prefect and MLflow load
# A cold ephemeral Prefect server on a busy 2-core machine can take longer than Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
