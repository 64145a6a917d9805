# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Each creates .venv on first use and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
# The torch build to install. On our CPU machines torch==2.13.0 is the local CPU build;
# on a GPU machine point this at the CUDA build you use (any torch >= 2.11 works).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test graphviz

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench,examples]"
	touch $@

# The Graphviz binary turns drawings into SVG/PNG; without it only DOT files are written.
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq graphviz >/dev/null; \
	  else echo "note: install Graphviz (e.g. apt-get install graphviz) for SVG drawings; DOT files are written without it"; fi; }

demo: $(VENV)/.installed graphviz
	$(PY) examples/train_long_context.py

test: $(VENV)/.installed graphviz
	$(PY) -m pytest
