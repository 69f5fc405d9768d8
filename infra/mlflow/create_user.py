"""One-shot (compose service `mlflow-init`): the MLflow user the workers sign in as, and its registered models.

Runs as the admin (MLFLOW_TRACKING_USERNAME/PASSWORD) against MLFLOW_TRACKING_URI; idempotent.
The worker user gets no admin rights: it manages what it creates (its experiment) and the registered
models named in MLFLOW_REGISTERED_MODELS (comma-separated; `tracking.registered_model` in params.yaml).

Why the registered models are created here: MLflow's basic-auth app (3.x) answers 403 PERMISSION_DENIED,
not 404, when a non-admin user reads an alias of a registered model that does not exist yet (it does not
reveal which names exist). The pipeline's first evaluate asks for the `champion` alias before anything is
registered, so a worker signing in as a non-admin user failed there on a fresh server. Created by the
admin with MANAGE granted to the worker user, the model exists from the start and the worker may register
versions and move its aliases, and nothing else.
"""

import os
import sys

from mlflow.server.auth.client import AuthServiceClient


def ensure_registered_model(name: str, username: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.create_registered_model(name, description="Registered by the training pipeline's workers.")
        created = "created"
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        created = "exists"
    try:
        AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"]).grant_user_permission(
            username, "registered_model", name, "MANAGE"
        )
        granted = "MANAGE granted"
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        granted = "MANAGE already granted"
    return f"registered model {name!r} {created}, {granted} to {username!r}"


def main() -> int:
    client = AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"])
    username = os.environ["MLFLOW_WORKER_USERNAME"]
    try:
        client.get_user(username)
        print(f"mlflow user {username!r} already exists")
    except Exception:  # the client raises MlflowException (404) for an unknown user
        client.create_user(username, os.environ["MLFLOW_WORKER_PASSWORD"])
        print(f"created mlflow user {username!r}")
    for name in filter(None, (n.strip() for n in os.environ.get("MLFLOW_REGISTERED_MODELS", "").split(","))):
        print(ensure_registered_model(name, username))
    return 0


if __name__ == "__main__":
    sys.exit(main())
