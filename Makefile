# Set-up, main job and tests on a fresh machine: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch first: an open range would otherwise pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/tl-vlm demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/load_memory.py
