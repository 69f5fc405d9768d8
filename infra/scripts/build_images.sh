#!/usr/bin/env bash
# Build the stack's CPU images from one build context (Docker's classic builder, which reads only the
# context's .dockerignore, so the context is staged: the project code as committed at HEAD, which is what
# the workers clone and run, plus infra/ from the working tree).
#   infra/scripts/build_images.sh BASE_IMAGE TAG_SUFFIX_FILE
# Env: DOCKER_HOST (the daemon), TP_IMAGE_TAG (default 0.1.0), TP_BUILD_NETWORK (default host: pip and apt
# reach the package registries through the host). Prints one line per image: name seconds.
set -euo pipefail
base=${1:?usage: build_images.sh BASE_IMAGE}
repo=$(cd "$(dirname "$0")/../.." && pwd)
tag=${TP_IMAGE_TAG:-0.1.0}
network=${TP_BUILD_NETWORK:-host}
context=$(mktemp -d "${TMPDIR:-/tmp}/tp-context.XXXXXX")
trap 'rm -rf "$context"' EXIT
git -C "$repo" archive HEAD pyproject.toml README.md components flows | tar -x -C "$context"
mkdir -p "$context/infra"
(cd "$repo" && tar -c --exclude=__pycache__ infra/requirements infra/worker-entrypoint.sh infra/check-secrets.sh \
   infra/mlflow infra/s3 infra/postgres infra/Dockerfile.*) | tar -x -C "$context"
cp "$repo/infra/Dockerfile.cpu.dockerignore" "$context/.dockerignore"
# TP_WHEELHOUSE_URL: pip in the build stages installs from this flat wheelhouse only (hashes still checked)
pip_args=""
if [ -n "${TP_WHEELHOUSE_URL:-}" ]; then
  pip_args="--no-index --find-links $TP_WHEELHOUSE_URL --trusted-host $(echo "$TP_WHEELHOUSE_URL" | sed -E 's#^[a-z]+://([^/:]+).*#\1#')"
fi
build() {  # name dockerfile
  local started=$SECONDS
  DOCKER_BUILDKIT=0 nice -n 10 docker build --quiet --network "$network" --build-arg "BASE_IMAGE=$base" \
    --build-arg "PIP_EXTRA_ARGS=$pip_args" \
    -f "$context/infra/$2" -t "$1" "$context" >/dev/null
  echo "$1 $((SECONDS - started))"
}
for spec in ${TP_IMAGES:-postgres:transfer-pipeline-postgres:15 s3:transfer-pipeline-s3:moto prefect:transfer-pipeline-prefect:3.9.1 mlflow:transfer-pipeline-mlflow:3.17.2 cpu:transfer-pipeline-cpu:$tag}; do
  build "${spec#*:}" "Dockerfile.${spec%%:*}"
done
