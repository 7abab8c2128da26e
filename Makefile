# lorafleet: every target CI uses is here; `make test` and `make demo` install what they need.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup assets tools test test-unit demo proto quality bench clean help

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
	$(PY) -m lorafleet.cli data --out .cache/data
	$(PY) -m lorafleet.cli tiny --arch llama --out .cache/tiny/llama

# Real prometheus + promtool (Debian's 2.42, unpacked into .cache/prometheus/bin; no service started)
# for the metrics tests: promtool lints the trainer's metric names, Prometheus scrapes it.
tools:
	bash scripts/install_prometheus.sh

test: setup tools
	$(PY) -m pytest -m "not gpu" -q -rs --durations=15 $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m "not gpu and not integration" -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m lorafleet.cli demo

# gRPC stubs: proto/lorafleet/v1/*.proto -> lorafleet/v1/*_pb2*.py (committed; `make quality` checks they are fresh).
proto: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/lorafleet/v1/*.proto

quality: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy lorafleet services

bench: setup
	$(PY) -m bench.train_bench

clean:
	rm -rf .cache runs bench/out .pytest_cache .mypy_cache .ruff_cache
