# Every target does its own set-up on a fresh machine: virtual environment, packages, and the
# sandbox image where a Docker engine answers.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: test lint demo models sandbox-image bench clean

# torch first, pinned: the CPU build 2.13.0, so that no other package pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
	touch $@

# The embedded model, cached under the user's cache (works offline once fetched).
models: $(STAMP)
	$(BIN)/critloop models fetch

# Builds the image when an engine answers; without one, Docker tests skip (CI makes them fail).
sandbox-image: $(STAMP)
	@if $(BIN)/python -c "from critloop.sandbox.docker_backend import docker_client; docker_client(timeout=3)" 2>/dev/null; then \
		$(BIN)/critloop sandbox build; \
	else \
		echo "no Docker engine answers: not building the sandbox image (Docker tests will skip)"; \
	fi

# mypy does not follow setuptools' package-dir mapping: check a symlinked `critloop` tree instead.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf .typecheck && mkdir -p .typecheck/critloop
	for f in critloop/*.py; do ln -s "$(CURDIR)/$$f" .typecheck/critloop/; done
	for d in agent tools graphs sandbox; do ln -s "$(CURDIR)/$$d" .typecheck/critloop/$$d; done
	cd .typecheck && $(CURDIR)/$(BIN)/mypy --config-file ../pyproject.toml -p critloop

test: lint sandbox-image models
	$(BIN)/pytest

# From a fresh machine to a finished refine loop on the embedded model: the environment, the
# model, the sandbox image where a Docker engine answers (else the local backend runs the code).
demo: $(STAMP) models sandbox-image
	$(BIN)/critloop solve --file examples/problems/arithmetic.txt --max-rounds 1

bench: sandbox-image models
	$(BIN)/python benchmarks/bench_sandbox.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_critic.py
	$(BIN)/python benchmarks/bench_batch.py
	$(BIN)/python benchmarks/bench_server.py

clean:
	-$(BIN)/critloop sandbox clean --all
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
