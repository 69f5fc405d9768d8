"""One-shot (compose service `mlflow-init`): create the MLflow user the workers sign in as.

Runs as the admin (MLFLOW_TRACKING_USERNAME/PASSWORD) against MLFLOW_TRACKING_URI; idempotent.
The worker user gets no admin rights: it manages what it creates (its experiment, its registered model).
"""

import os
import sys

from mlflow.server.auth.client import AuthServiceClient


def main() -> int:
    client = AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"])
    username = os.environ["MLFLOW_WORKER_USERNAME"]
    try:
        client.get_user(username)
        print(f"mlflow user {username!r} already exists")
    except Exception:  # the client raises MlflowException (404) for an unknown user
        client.create_user(username, os.environ["MLFLOW_WORKER_PASSWORD"])
        print(f"created mlflow user {username!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
