# The two everyday commands, `make train` and `make test`; each first builds the virtual environment when it is
# missing or older than pyproject.toml (the stamp file .venv/.installed). torch is pinned first: an open `torch`
# requirement would pull a multi-GB CUDA build on a CPU machine (on a GPU cluster, install the CUDA build of
# torch into the environment first instead).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m train

# the linter first (pyproject.toml's [tool.ruff]); then one pytest worker per core, at most 4 (each multi-process
# test spawns 2-4 ranks of its own); steal work so
# the longest tests do not leave a core idle at the end
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -q -n auto --maxprocesses 4 --dist worksteal
