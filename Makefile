# Two commands on a fresh machine:
#   make repro   the main job: `dvc repro` on the embedded default (sample photos, small model, CPU)
#   make test    the test suite (what CI runs)
# Both create .venv and install the project into it first.

PYTHON ?= python3
# The small CPU build of PyTorch. GPU users: make setup TORCH="torch==2.14.1" (a CUDA build), or
# install their own CUDA torch into .venv first; pyproject's torch>=2.4 keeps it.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export RAY_USAGE_STATS_ENABLED := 0
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: setup repro test lint bench serve chromium

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[ray,test]"
	touch $@

setup: $(VENV)/.installed

repro: setup
	dvc repro

# The browser test drives Debian's Chromium (never a downloaded browser build).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Two processes (pytest-xdist), each taking whole files: a file's module fixtures (a DVC repo,
# a Ray cluster) are built once. TEST_PROCESSES=0 runs everything in this one process.
TEST_PROCESSES ?= 2
test: setup chromium
	pytest -q -n $(TEST_PROCESSES) --dist loadfile

lint: setup
	ruff check dfnet pipelines tune serve bench tests

bench: setup
	python bench/inference.py

# The inpainting endpoint on a local Ray started with serve/ray.env's settings (see the README).
serve: setup
	env $$(python -m serve.ray_env) serve run serve/config.yaml
