# The two commands a new user runs (see README):
#   make demo   install, then run the main job on its embedded defaults
#   make test   install, then run the test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test test-slow lint

install: $(VENV)/.installed

# torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/miles pipeline

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
