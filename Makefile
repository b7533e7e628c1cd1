# Set-up and the two everyday commands. torch is pinned first: an open `torch` requirement would pull a
# multi-GB CUDA build on a CPU machine (on a GPU cluster, install the CUDA build of torch first instead).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train test
setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'

train:
	$(BIN)/python -m train

# one pytest worker per core, at most 4 (each multi-process test spawns 2-4 ranks of its own); steal work so
# the longest tests do not leave a core idle at the end
test:
	$(BIN)/python -m pytest tests -q -n auto --maxprocesses 4 --dist worksteal
