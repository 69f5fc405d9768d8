#!/bin/sh
# Worker start-up: make sure TP_WORKSPACE is a git + DVC checkout of the project, point DVC at the
# object store, then run the given command (a Prefect worker). Credentials come from the environment.
set -eu

# No placeholder or missing credentials (infra/check-secrets.sh; installed as tp-check-secrets in the images).
checker=$(command -v tp-check-secrets || echo "$(dirname "$0")/check-secrets.sh")
sh "$checker" ${TP_REQUIRED_SECRETS:-PREFECT_API_AUTH_STRING MLFLOW_TRACKING_PASSWORD}

workspace="${TP_WORKSPACE:-/workspace}"

if [ ! -d "$workspace/.git" ]; then
  if [ -z "${TP_GIT_REPOSITORY:-}" ]; then
    echo "tp-worker: $workspace is not a git checkout and TP_GIT_REPOSITORY is not set" >&2
    exit 2
  fi
  echo "tp-worker: cloning $TP_GIT_REPOSITORY (${TP_GIT_BRANCH:-main}) into $workspace"
  git clone --branch "${TP_GIT_BRANCH:-main}" "$TP_GIT_REPOSITORY" "$workspace"
fi

cd "$workspace"
if [ -n "${DVC_REMOTE_URL:-}" ]; then
  # --local: the remote lives in .dvc/config.local, so the worker never dirties the checkout.
  dvc remote add --local --force --default storage "$DVC_REMOTE_URL"
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
    dvc remote modify --local storage endpointurl "$AWS_ENDPOINT_URL"
  fi
fi

exec "$@"
