# tunelab: `make demo` runs the main job on the embedded default model; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.tunelab-installed

.PHONY: demo test test-fast lint format bench gpu-test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Without a GPU take the CPU build of torch first (a plain `torch` pulls the CUDA build).
	if command -v nvidia-smi >/dev/null 2>&1 || $(PY) -c "import torch" 2>/dev/null; then :; \
	  else $(PIP) install -q torch==2.13.0 || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunelab env || true
	$(PY) -m tunelab.demo

test: $(STAMP)
	$(VENV)/bin/ruff check tunelab tests bench
	$(VENV)/bin/ruff format --check tunelab tests bench
	$(PY) -m pytest -q --timeout=900

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check tunelab tests bench
	$(VENV)/bin/ruff format --check tunelab tests bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix tunelab tests bench
	$(VENV)/bin/ruff format tunelab tests bench

gpu-test: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(PY) bench/generate_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
