# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Each creates .venv on first use and installs what it needs, at the versions in
# constraints.txt (the lock CI tests). Other targets:
#   make test-latest   the suite against the newest releases of every dependency (.venv-latest)
#   make lock          rewrite constraints.txt from .venv-latest (after test-latest passed)
#   make fuzz          the adversarial near-miss suites at nightly size (>= 10,000 examples)
#   make nightly       fuzz, and the tests marked nightly (Inductor numerics on real models)

PYTHON ?= python3
VENV ?= .venv
# The torch build to install. On our CPU machines torch==2.13.0 is the local CPU build;
# on a GPU machine point this at the CUDA build you use (any torch >= 2.11 works).
TORCH ?= torch==2.13.0
# The lock; `make test LOCK=` installs the newest releases the ranges in pyproject.toml allow.
LOCK ?= constraints.txt
PY := $(VENV)/bin/python
LATEST := .venv-latest
# Nightly sizes: near-miss masks are cheap (about 0.1 s each), compiled scan bodies and loss
# heads cost seconds each.
FUZZ_MASKS ?= 10000
FUZZ_EXAMPLES ?= 400
# pytest-xdist workers for `make test` (tests compile graphs: mostly one core each).
TEST_WORKERS ?= 2

.PHONY: demo test test-latest lock fuzz nightly graphviz

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) -e ".[test,bench,examples]"
	touch $@

# The Graphviz binary turns drawings into SVG/PNG; without it only DOT files are written.
graphviz:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq graphviz >/dev/null; \
	  else echo "note: install Graphviz (e.g. apt-get install graphviz) for SVG drawings; DOT files are written without it"; fi; }

demo: $(VENV)/.installed graphviz
	$(PY) examples/train_long_context.py

# --dist worksteal: a few tests (Inductor compiles, process-group launches) take 1-2 minutes;
# a worker that runs out of tests takes queued ones from the other instead of idling.
# Tests marked nightly (Inductor numerics on real models, compiled from scratch) run in
# `make nightly`; Inductor itself is still covered here by smaller models.
test: $(VENV)/.installed graphviz
	LONGCTX_EXPECT_LOCK=$(LOCK) $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=20 -m "not nightly"

test-latest: graphviz
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,bench,examples]"
	$(LATEST)/bin/python -m pytest

lock:
	@test -x $(LATEST)/bin/python || { echo "run 'make test-latest' first"; exit 1; }
	{ sed -n '1,/^[^#]/{/^#/p}' constraints.txt; \
	  $(LATEST)/bin/python -m pip freeze | grep -v -e '^-e' -e '^#' -e '^longctx' -e '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

fuzz: $(VENV)/.installed
	LONGCTX_FUZZ_EXAMPLES=$(FUZZ_MASKS) $(PY) -m pytest tests/adversarial/test_near_miss_masks.py -q -s -p no:cacheprovider
	LONGCTX_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/adversarial -q -s -p no:cacheprovider --ignore=tests/adversarial/test_near_miss_masks.py

nightly: fuzz
	$(PY) -m pytest -n $(TEST_WORKERS) -m nightly -p no:cacheprovider
