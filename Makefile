# lorafleet: every target CI uses is here; `make test` and `make demo` install what they need.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup assets tools test test-unit demo dashboard proto proto-check quality bench images images-test clean help

help:
	@echo "make demo | test | quality | bench | proto | setup | clean"

# torch first and pinned: a bare `torch` requirement would pull several GB of CUDA wheels
# (shared/STACK.md); constraints.txt then keeps pip from ever replacing it.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | { grep -v "^WARNING: Location" || true; }
	set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import torch, transformers, peft, deepspeed, lorafleet" 2>/dev/null
	@touch $(STAMP)

setup: $(STAMP)

# The embedded defaults: bundled datasets and the offline tiny base model (built once, nothing downloaded).
assets: setup
	$(PY) -m services.cli data --out .cache/data
	$(PY) -m services.cli tiny --arch llama --out .cache/tiny/llama

# Real prometheus + promtool (Debian's 2.42, unpacked into .cache/prometheus/bin; no service started)
# for the metrics tests: promtool lints the trainer's metric names, Prometheus scrapes it.
# kubectl >= 1.27 (kustomize v5) into .cache/kubectl/bin for the manifest tests (tests/test_k8s_manifests.py).
tools:
	bash scripts/install_prometheus.sh
	bash scripts/install_kubectl.sh
	bash scripts/install_chromium.sh

test: setup tools
	$(PY) -m pytest -m "not gpu and not images" -q -rs --durations=15 $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not gpu and not integration" -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m services.cli demo

# The dashboard (services/dashboard) on http://127.0.0.1:$(DASHBOARD_PORT), against running services:
# LORAFLEET_TRAINER_ADDR / LORAFLEET_INFERENCE_ADDR (default 127.0.0.1:50051 / :50052), tokens and TLS
# CAs in LORAFLEET_{TRAINER,INFERENCE}_{TOKEN,TLS_CA}; its own metrics on :9103 (LORAFLEET_DASHBOARD_METRICS_PORT).
# Services to point it at: `python -m services.demo --keep-running` prints the addresses to use.
# (services/dashboard/__main__.py: `streamlit run` with the metrics endpoint up before the first visit.)
DASHBOARD_PORT ?= 8501
DASHBOARD_HOST ?= 127.0.0.1
dashboard: setup
	$(PY) -m services.dashboard --port $(DASHBOARD_PORT) --host $(DASHBOARD_HOST)

# gRPC stubs: proto/lorafleet/v1/*.proto -> lorafleet/v1/*_pb2*.py (committed, never edited by hand).
PROTOC = $(PY) -m grpc_tools.protoc -Iproto
proto: setup
	$(PROTOC) --python_out=. --grpc_python_out=. --pyi_out=. proto/lorafleet/v1/*.proto

# What CI runs first: lint, format, types, then the committed stubs against freshly generated ones.
quality: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy lorafleet services
	@$(MAKE) --no-print-directory -o $(STAMP) proto-check

# Regenerates the stubs into a temporary directory and diffs them against $(STUBS): any difference,
# or a stub without its .proto, fails (then run `make proto` and commit the result).
STUBS ?= lorafleet/v1
proto-check: setup
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(PROTOC) --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp proto/lorafleet/v1/*.proto && \
	  if diff -r -x __init__.py -x __pycache__ $$tmp/lorafleet/v1 $(STUBS); then echo "proto stubs: up to date"; \
	  else echo "$(STUBS) differs from proto/ (above): run make proto and commit the stubs" >&2; exit 1; fi

# Container images of the services (services/*/Dockerfile, built from the repository root), CPU variant
# by default (TORCH_VARIANT=cu128 for GPU nodes). BUILDER=docker needs a Docker engine; BUILDER=buildah
# (what CI runs, as root: scripts/build_images.sh) needs no engine and no registry: it makes the base
# from Debian packages when it cannot pull it, and caches it with the layers machine-wide
# (/var/cache/lorafleet/images when writable, else .cache/images; LORAFLEET_IMAGE_CACHE overrides).
# `make images REGISTRY=registry.example.com/lorafleet/ IMAGE_TAG=0.1.0`, then push them and set the
# same names in your overlay's `images:` (k8s/overlays/gpu/kustomization.yaml).
REGISTRY ?=
IMAGE_TAG ?= 0.1.0
TORCH_VARIANT ?= cpu
BUILDER ?= docker
DOCKER ?= docker
images:
ifeq ($(BUILDER),buildah)
	REGISTRY=$(REGISTRY) IMAGE_TAG=$(IMAGE_TAG) TORCH_VARIANT=$(TORCH_VARIANT) bash scripts/build_images.sh
else
	$(DOCKER) build --build-arg TORCH_VARIANT=$(TORCH_VARIANT) -f services/trainer/Dockerfile --target server -t $(REGISTRY)lorafleet-trainer:$(IMAGE_TAG) .
	$(DOCKER) build --build-arg TORCH_VARIANT=$(TORCH_VARIANT) -f services/trainer/Dockerfile --target worker -t $(REGISTRY)lorafleet-trainer-worker:$(IMAGE_TAG) .
	$(DOCKER) build --build-arg TORCH_VARIANT=$(TORCH_VARIANT) -f services/inference/Dockerfile --target inference -t $(REGISTRY)lorafleet-inference:$(IMAGE_TAG) .
	$(DOCKER) build --build-arg TORCH_VARIANT=$(TORCH_VARIANT) -f services/dashboard/Dockerfile --target dashboard -t $(REGISTRY)lorafleet-dashboard:$(IMAGE_TAG) .
endif

# Smoke-runs the images `make images BUILDER=buildah` built, each as its pod runs it (command, env and
# mounts from the rendered manifests and the launcher's Job), each checked to write nothing outside its
# volumes (read-only root): tests/test_images.py, marker `images`. LORAFLEET_IMAGE_SCREENSHOTS=DIR keeps
# the dashboard image's screenshot of its Jobs page.
images-test: setup tools
	$(PY) -m pytest -m images -q -rs tests/test_images.py $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.train_bench
	$(PY) -m bench.inference_bench
	$(PY) -m bench.long_prompt_bench
	$(PY) -m bench.http_bench
	$(PY) -m bench.dpo_bench
	$(PY) -m bench.report

clean:
	rm -rf .cache runs bench/out .pytest_cache .mypy_cache .ruff_cache
