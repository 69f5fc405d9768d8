# One entry point for people and CI. `make run` and `make test` each install what they need first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# TensorFlow build: cpu | gpu (never both in one environment)
TF_EXTRA ?= cpu
SHARED ?= ../shared
# Pre-downloaded ImageNet weights, copied into KERAS_HOME when present (offline machines, CI)
KERAS_SEED ?= $(SHARED)/keras/models
# Data source for `make run`; empty keeps ingest.source from params.yaml
SOURCE ?=
# Tests in two processes, a test module per process (its fixtures train once); three on 2 cores
# showed no clear gain (10.4 to 12.8 min against 11.7 to 12.4; README). TEST_WORKERS=0 runs them in this one
TEST_WORKERS ?= 2
PYTEST_PARALLEL = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

export KERAS_HOME ?= $(CURDIR)/.keras
export PATH := $(BIN):$(PATH)
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install install-unlocked lock lint docs format keras-home test-py312 test-unit-fast benchmark-checks run test test-fast benchmark benchmark-sizes benchmark-scale soak e2e-loopback mlflow-ui

# The environment is the lock, not whatever the index serves today: requirements/dev-$(TF_EXTRA).lock
# (hashed, x86_64 Linux, Python 3.11) is synced exactly (packages not in it are removed), then the
# project itself goes in as an editable install with no dependency resolution. `make lock` rewrites it.
# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set, every process would otherwise
# compile TensorFlow from source again (importing it took 12 s of CPU instead of 5 here).
UV_VERSION ?= 0.13.9
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# Python 3.11 is the main interpreter (dev-cpu.lock, dev-gpu.lock, the images); 3.12 has a cpu lock of its own
LOCK_FILE := requirements/dev-$(TF_EXTRA)$(if $(filter 3.12,$(PYTHON_VERSION)),-py3.12).lock
UV := $(BIN)/uv

# 1 where a lock applies (x86_64 Linux, Python 3.11, or 3.12 for cpu); elsewhere install falls back to install-unlocked
LOCKED_PLATFORM := $(shell test -f $(LOCK_FILE) && $(PYTHON) -c 'import platform, sys; print(int(platform.system() == "Linux" and platform.machine() == "x86_64" and sys.version_info[:2] in ((3, 11), (3, 12))))')

$(VENV)/.installed-$(TF_EXTRA): pyproject.toml $(LOCK_FILE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ "$(LOCKED_PLATFORM)" != 1 ]; then \
	  echo "no lock for this platform or Python: resolving pyproject.toml instead (not the environment CI tested)"; \
	  $(MAKE) --no-print-directory install-unlocked; \
	else \
	  test -x $(UV) && [ "$$($(UV) --version | cut -d' ' -f2)" = "$(UV_VERSION)" ] || $(BIN)/python -m pip install -q "uv==$(UV_VERSION)"; \
	  $(UV) pip sync -q --python $(BIN)/python --require-hashes --compile-bytecode $(LOCK_FILE) && \
	  $(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e . || exit 1; \
	fi
	rm -f $(VENV)/.installed-*
	touch $@

# Another platform (macOS, Linux on Arm, another Python) has no lock: resolve pyproject's ranges there
# instead. That environment is not the one CI tested; `make test` says whether it works.
install-unlocked:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e ".[$(TF_EXTRA),dev]"

install: $(VENV)/.installed-$(TF_EXTRA)

keras-home:
	mkdir -p $(KERAS_HOME)/models
	if [ -d "$(KERAS_SEED)" ]; then cp -n $(KERAS_SEED)/* $(KERAS_HOME)/models/ 2>/dev/null || true; chmod u+w $(KERAS_HOME)/models/*; fi

run: install keras-home
	$(BIN)/python -m flows.training $(if $(SOURCE),--source $(SOURCE))

# ruff, configured in pyproject.toml: formatting and a small rule set; CI fails on either
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# docs/architecture.md's module map, regenerated from the code (tests/unit/test_architecture_doc.py checks it)
docs: install
	$(BIN)/python docs/architecture_graph.py

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install keras-home
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not benchmark_check"

# The benchmarks' own dry runs (benchmarks/gpu_check.sh on CPU under JAX): CI runs them after make test
benchmark-checks: install keras-home
	$(BIN)/python -m pytest -m benchmark_check

# The second interpreter CI runs: Python 3.12 in its own venv, the unit tests that train no model
# (pyenv's shims answer `command -v` for versions that are not active: ask each one for its real path)
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
  $$p -c 'import sys; print(sys.executable)' 2>/dev/null && break; done)
test-py312:
	@test -n "$(PYTHON312)" || { echo "test-py312: no Python 3.12 on this machine: skipped"; exit 0; }; \
	$(MAKE) --no-print-directory PYTHON="$(PYTHON312)" VENV=.venv-py3.12 test-unit-fast

test-unit-fast: install keras-home
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) tests/unit -m "not slow and not benchmark_check"

test-fast: install keras-home
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow and not benchmark_check"

# Results land in benchmarks/results/$(NAME).{json,md} and $(NAME)_curves.png
benchmark: install keras-home
	$(BIN)/python -m benchmarks.run $(if $(SOURCE),--source $(SOURCE)) $(if $(NAME),--name $(NAME)) $(ARGS)

# Accuracy against data size: pipeline vs careful baseline vs linear probe (benchmarks/results/sizes.{json,md,png});
# SIZES=20,50 or ONLY=flowers|hymenoptera reruns part of it (rows merge into sizes.json)
benchmark-sizes: install keras-home
	$(BIN)/python -m benchmarks.sizes $(if $(SIZES),--sizes $(SIZES)) $(if $(ONLY),--only $(ONLY)) $(ARGS)

# ingest, validate and train_head on ~3.7k, 18k and 37k distinct images: benchmarks/results/scale.{json,md,png}
benchmark-scale: install keras-home
	$(BIN)/python -m benchmarks.scale $(if $(SIZES),--sizes $(SIZES)) $(ARGS)

soak: install keras-home
	$(BIN)/python -m benchmarks.soak $(if $(SOURCE),--source $(SOURCE))

# Real Prefect + MLflow servers and two workers on 127.0.0.1; finetune goes to the gpu pool (infra/README.md)
e2e-loopback: install keras-home
	$(BIN)/python infra/scripts/loopback_e2e.py

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# ---- infra/ (INFRA): offline validation, the container end-to-end run, lock files
.PHONY: validate-infra e2e-docker lock-images
LOCK_FLAGS = --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --generate-hashes --no-header --annotation-style line

# Kubernetes schema + `kubectl kustomize infra/` + `docker compose config` + least-privilege rules; offline, seconds
validate-infra: install
	$(BIN)/python infra/scripts/validate_infra.py

# Private Docker daemon, local base image, every CPU image, the compose stack, two training runs, a killed
# worker; tears everything down (infra/README.md, "make e2e-docker"). Needs root; installs docker.io and debootstrap.
e2e-docker: install keras-home
	command -v dockerd >/dev/null && command -v debootstrap >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io debootstrap)
	$(BIN)/python infra/scripts/docker_e2e.py

# Every lock in one command: the development environment (cpu and gpu) and the images'. Upgrading on
# purpose: bump the range in pyproject.toml (or an .in file), `make lock`, `make test`, commit the locks
# with the change. `make lock UPGRADE=moto` moves one package to its newest allowed release; `UPGRADE=all` all.
UPGRADE ?=
UPGRADE_FLAGS = $(if $(filter all,$(UPGRADE)),--upgrade,$(foreach pkg,$(UPGRADE),--upgrade-package $(pkg)))

lock:
	test -x $(UV) || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(BIN)/python -m pip install -q "uv==$(UV_VERSION)"; }
	for extra in cpu gpu; do \
	  $(UV) pip compile -q $(LOCK_FLAGS) $(UPGRADE_FLAGS) pyproject.toml --extra $$extra --extra dev -o requirements/dev-$$extra.lock || exit 1; done
	# 3.12 starts from 3.11's pins, so both interpreters test the same versions wherever both have wheels
	test -f requirements/dev-cpu-py3.12.lock || cp requirements/dev-cpu.lock requirements/dev-cpu-py3.12.lock
	$(UV) pip compile -q $(subst 3.11,3.12,$(LOCK_FLAGS)) $(UPGRADE_FLAGS) pyproject.toml --extra cpu --extra dev \
	  -o requirements/dev-cpu-py3.12.lock
	cd infra/requirements && for name in mlflow prefect s3; do \
	  $(UV) pip compile -q $(LOCK_FLAGS) $(UPGRADE_FLAGS) $$name.in -o $$name.lock || exit 1; done
	cd infra/requirements && for extra in cpu gpu; do \
	  $(UV) pip compile -q $(LOCK_FLAGS) $(UPGRADE_FLAGS) ../../pyproject.toml worker-$$extra.in --extra $$extra --extra s3 -o worker-$$extra.lock || exit 1; done

# Older name of `make lock`
lock-images: lock
