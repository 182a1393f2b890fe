# Every target does its own set-up on a fresh machine: virtual environment, packages, and the
# sandbox image where a Docker engine answers.
#
# Packages come from requirements.lock, the exact versions CI tested: it is passed as constraints
# (and build constraints) to every install, so a fresh machine gets what CI ran, and upgrading is a
# deliberate commit (`make lock`). `make demo` installs only what the demo needs (the `local`
# extra); `make test` adds the `dev` extra, which builds llama.cpp from source, `ray`, `train` and `tracing`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
TORCH_VERSION ?= 2.13.0
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
# How the test suite runs; CI wraps it in .ci/offline (no network once set-up is done).
PYTEST ?= $(BIN)/pytest
# Two pytest workers, a test file each at a time (module fixtures such as the Ray cluster stay in
# one worker): many tests wait on servers, containers and clusters, so two share two cores well.
PYTEST_WORKERS ?= -n 2 --dist loadfile
UV_INSTALL = $(BIN)/uv pip install --quiet --python $(BIN)/python --constraints $(LOCK) --build-constraints $(LOCK)

# Native code is built for a portable x86-64 baseline (AVX2/FMA/F16C), never for the build
# machine's own CPU: ggml's native build of llama.cpp dies with a general protection fault on CPUs
# that advertise AVX-512 and AMX under a hypervisor. The multimodal library (LLAVA_BUILD), which
# critloop never loads, is left out of the build.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: test test-fast lint demo models sandbox-image bench lock clean

# torch first, through pip and pinned by the lock: pip takes the CPU build where a local wheel or
# index offers it, and nothing installed later pulls a CUDA build (torch is then already satisfied).
# uv, also pinned by the lock, installs the rest.
$(DEMO_STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) torch uv
	$(UV_INSTALL) -e '.[local]'
	touch $@

$(TEST_STAMP): $(DEMO_STAMP)
	$(UV_INSTALL) -e '.[local,dev,ray,train,tracing]'
	touch $@

# The embedded model, cached under the user's cache (works offline once fetched).
models: $(DEMO_STAMP)
	$(BIN)/critloop models fetch

# Builds the image when an engine answers; without one, Docker tests skip (CI makes them fail).
sandbox-image: $(DEMO_STAMP)
	@if $(BIN)/python -c "from critloop.sandbox.docker_backend import docker_client; docker_client(timeout=3)" 2>/dev/null; then \
		$(BIN)/critloop sandbox build; \
	else \
		echo "no Docker engine answers: not building the sandbox image (Docker tests will skip)"; \
	fi

# mypy does not follow setuptools' package-dir mapping: check a symlinked `critloop` tree instead.
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf .typecheck && mkdir -p .typecheck/critloop
	for f in critloop/*.py critloop/cli; do ln -s "$(CURDIR)/$$f" .typecheck/critloop/; done
	for d in agent tools graphs sandbox; do ln -s "$(CURDIR)/$$d" .typecheck/critloop/$$d; done
	cd .typecheck && $(CURDIR)/$(BIN)/mypy --config-file ../pyproject.toml -p critloop

test: lint sandbox-image models
	$(PYTEST) $(PYTEST_WORKERS)

# The inner loop: everything but the slow tests (real models, llama.cpp, end-to-end runs).
test-fast: $(TEST_STAMP) sandbox-image
	$(PYTEST) $(PYTEST_WORKERS) -m "not slow"

# From a fresh machine to a finished refine loop on the embedded model: the environment, the
# model, the sandbox image where a Docker engine answers (else the local backend runs the code).
demo: $(DEMO_STAMP) models sandbox-image
	$(BIN)/critloop solve --file examples/problems/arithmetic.txt --max-rounds 1

bench: $(TEST_STAMP) sandbox-image models
	$(BIN)/python benchmarks/bench_sandbox.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_critic.py
	$(BIN)/python benchmarks/bench_routing.py
	$(BIN)/python benchmarks/bench_batch.py
	$(BIN)/python benchmarks/bench_batch.py --ray
	$(BIN)/python benchmarks/bench_synth.py
	$(BIN)/python benchmarks/bench_view.py
	$(BIN)/python benchmarks/bench_server.py

# Re-resolve every dependency to its newest allowed release (torch: TORCH_VERSION, the CPU build) in
# a scratch environment and write the lock from what was installed there. Review the diff and run
# `make test` before committing it.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION) uv
	$(LOCK_VENV)/bin/uv pip install --quiet --python $(LOCK_VENV)/bin/python -e '.[local,dev,ray,train,tracing]' setuptools scikit-build-core
	{ echo "# The exact versions CI tested (Python 3.11, Linux x86-64), passed as constraints to every"; \
	  echo "# install by the Makefile. Regenerate with 'make lock' (a deliberate upgrade): review the diff."; \
	  $(LOCK_VENV)/bin/uv pip freeze --python $(LOCK_VENV)/bin/python --exclude-editable | sed -e 's/+cpu$$//' -e '/^pip==/d'; \
	} > $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	-$(BIN)/critloop sandbox clean --all
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
