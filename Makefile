# mpckv — set-up, tests and demo. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build of torch where there is no GPU (lies on local disk on our machines). On a GPU machine the
# system's CUDA torch is reused through --system-site-packages.
TORCH_SPEC   ?= torch==2.13.0
CRYPTEN_SPEC ?= crypten==0.4.1
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?= -m "not slow"

.PHONY: install test lint typecheck unit test-all demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
ifeq ($(HAS_GPU),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
else
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
endif
	# CrypTen pins a dead `sklearn` package: install it without dependencies, then what it imports.
	$(BIN)/pip install -q --no-deps $(CRYPTEN_SPEC)
	$(BIN)/pip install -q -e '.[test,mpc,hf,eval]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy mpckv plaintext kernels protocols

unit: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

test-all: PYTEST_ARGS =
test-all: test

demo: install
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
