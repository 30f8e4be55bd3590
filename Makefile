VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-all lint format bench

# Create the virtual environment if missing and install the package with its dev extras,
# pinned to the versions we test with (constraints.txt). Re-runs when those files change.
# stardist is installed for its bundled nuclei image only (the Mask R-CNN overfit test, the RoI
# pooling ablation): --no-deps keeps TensorFlow out.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -c constraints.txt stardist
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/denseseg demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not heavy" --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not heavy"

# Everything: also the tests marked heavy (full-size exports, the demo's and Mask R-CNN's training
# claims, compile, real signals; about 35 minutes on two cores).
test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks
