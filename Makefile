# Two entry points, both self-contained on a fresh machine:
#   make run   - create .venv, install, fetch + verify the default models, generate on a default prompt
#   make test  - create .venv, install, lint, run the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Write a Python function that returns the n-th Fibonacci number, with a docstring.

.PHONY: run test install lint

# The fastest lossless configuration measured on this CPU: plain decoding on llama.cpp (README,
# "Measured here on llama.cpp"); METHOD=chain etc. to try the others.
METHOD ?= ar

run: install
	$(BIN)/swarmspec fetch
	$(BIN)/swarmspec generate "$(PROMPT)" --method $(METHOD)

test: install lint
	$(BIN)/python -m pytest -v -rs --durations=30

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

install: $(VENV)/.installed

# torch is pinned and installed first: `pip install torch==2.13.0` takes the CPU wheel on this machine,
# while an unpinned torch would pull a multi-GB CUDA build. llama-cpp-python (pinned in pyproject.toml)
# is built from source for this CPU, without llamafile's sgemm (exactness: src/swarmspec/runners/
# llama_cpp.py) and without its multimodal library; --no-cache-dir, because pip's wheel cache ignores
# CMAKE_ARGS and could hand back a build made with other options.
LLAMA_CPP_CMAKE_ARGS := -DGGML_LLAMAFILE=OFF -DLLAVA_BUILD=OFF
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir \
		"$$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
	$(BIN)/pip install -q -e '.[models,dev]'
	touch $@
