# darkroom: `make run` serves on the embedded defaults, `make test` runs the whole suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on machines without CUDA (here it lies on disk); set TORCH_SPEC for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
REDIS_URL ?= redis://127.0.0.1:6379/0
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install run test test-fast lint format bench bench-gpu services clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[worker,dev]"
	# Without its opencv-python (GUI) dependency: the worker extra brings opencv-python-headless.
	$(PY) -m pip install -q --no-deps "invisible-watermark>=0.2,<0.3"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/darkroom dev

# Starts what the tests need that is not already running (Redis, PostgreSQL, a compose parser).
services:
	@bash .ci/services

test: install services
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check api shared worker cli client tests bench
	$(VENV)/bin/ruff format --check api shared worker cli client tests bench
	$(VENV)/bin/mypy api shared worker cli client

format: install
	$(VENV)/bin/ruff check --fix api shared worker cli client tests bench
	$(VENV)/bin/ruff format api shared worker cli client tests bench

bench: install services
	$(PY) -m bench.api
	$(PY) -m bench.e2e
	$(PY) -m bench.encode

# On a GPU host with this venv: REDIS_SERVER=/path/to/redis-server make bench-gpu. One with no registry and
# no Redis: bench/gpu-carry.sh here, bench/gpu-host.sh there (docs/gpu-bench.md).
REDIS_SERVER ?= $(shell command -v redis-server)
bench-gpu:
	$(PY) -m bench.gpu --redis-server "$(REDIS_SERVER)"

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
